"""Where a sweep stands, from its run folders alone.

    python -m benchmarks.status --results results/runs                      # every run folder
    python -m benchmarks.status --method all --benchmark split_cifar100 --protocol paper \\
        --out results/runs          # a planned sweep: the same flags as its benchmarks.run

Each run is one of:

- ``done``: every planned task has its accuracy row;
- ``running``: a live process holds the run folder's lock (:mod:`benchmarks.core.lock`); with
  the last epoch trained and its mean loss (``epochs.csv``, :mod:`benchmarks.core.epoch_log`),
  also shown for ``partial`` runs;
- ``partial``: a folder with fewer tasks learned than planned, and no live holder (killed,
  waiting for a requeue, or never launched again), with the time of its last progress (the
  newest of rows, checkpoints and store index);
- ``failed``: its last job ended with an error and nothing progressed since: the last error
  line and the job's log (``.sweep/jobs/<key>.json``, written by :mod:`benchmarks.exec.launch.job`);
- ``missing``: planned, but no run folder (only with plan flags);
- ``damaged``: a run folder whose files cannot be trusted, with why: its ``config.json`` or
  ``rows.csv`` unreadable, or an accuracy that is not a number in [0, 1] (a NaN row is
  never averaged over the tasks that remain; the analysis leaves such a run out);
- ``not-run``: a folder with another tool's ``config.json`` (listed, otherwise ignored: it
  does not count against the exit status).

A run's ``job.json`` (or a sweep's job record) that is damaged or lacks its end is named in
the run's line and otherwise ignored: the folder itself says how far the run got.

Exit status: 0 when every run is done, 1 otherwise (2: bad flags).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from benchmarks.core.epoch_log import FILE, read_epochs
from benchmarks.core.lock import is_locked
from benchmarks.core.results import COLUMNS, NotARunError, read_rows, read_run_config, rows_damage
from benchmarks.exec.sweep import Job, find_run_dir, sweep_dir

STATES = ("done", "running", "partial", "failed", "missing", "damaged", "not-run")
JOB_STATES = ("done", "failed")  # what benchmarks.exec.launch.job records


@dataclass
class RunStatus:
    name: str
    state: str
    run_dir: Path | None = None
    learned: int = 0
    planned: int | None = None
    last_progress: float | None = None
    mean_accuracy: float | None = None
    error: str | None = None
    log: str | None = None
    last_epoch: dict | None = None  # the last row of epochs.csv (benchmarks.core.epoch_log)
    note: str | None = None

    def line(self) -> str:
        parts = [f"{self.state:<8} {self.name}"]
        if self.planned is not None:
            parts.append(f"{self.learned}/{self.planned} tasks")
        if self.mean_accuracy is not None:
            parts.append(f"mean acc {self.mean_accuracy:.1%}")
        if self.last_epoch is not None and self.state in ("running", "partial"):
            e = self.last_epoch
            parts.append(f"task {int(e['task']) + 1} [{e['phase']}] epoch {int(e['epoch']) + 1}/"
                         f"{int(e['epochs'])} loss {float(e['loss']):.4f}")
        if self.last_progress is not None and self.state != "done":
            parts.append("last progress " + time.strftime("%Y-%m-%d %H:%M:%S",
                                                          time.localtime(self.last_progress)))
        if self.error:
            parts.append(f"error: {self.error}")
        if self.log:
            parts.append(f"log: {self.log}")
        if self.note:
            parts.append(f"note: {self.note}")
        return " | ".join(parts)


def folder_progress(run_dir: Path) -> RunStatus:
    """Tasks learned / planned, mean accuracy after the last learned task and the time of the
    last progress of one run folder (its state: done or partial; see :func:`job_status`)."""
    status = RunStatus(run_dir.name, "partial", run_dir)
    try:
        config = read_run_config(run_dir)
        status.planned = len(config["tasks"]) if config and "tasks" in config else None
        if config is not None and status.planned is None:  # never done: not "partial" forever
            raise ValueError(f"{run_dir / 'config.json'} has no 'tasks': the planned tasks "
                             f"are unknown")
    except NotARunError as err:
        status.state, status.error = "not-run", str(err)
        return status
    except ValueError as err:
        status.state, status.error = "damaged", str(err)
    rows_path = run_dir / "rows.csv"
    try:
        rows = read_rows(rows_path)
    except ValueError as err:
        rows, status.state, status.error = pd.DataFrame(columns=COLUMNS), "damaged", str(err)
    damage = rows_damage(rows)
    if damage:
        status.state, status.error = "damaged", f"{rows_path}: {damage}"
        return status
    if not rows.empty:
        acc = rows[rows.metric == "accuracy"]
        own = acc[acc.task == acc.after_task]
        status.learned = len(set(own.task))
        if status.learned:
            last = acc[acc.after_task == acc.after_task.max()]
            status.mean_accuracy = float(last.value.mean())
    epochs = read_epochs(run_dir)
    if len(epochs):
        status.last_epoch = epochs.iloc[-1].to_dict()
    stamps = [p.stat().st_mtime for p in (rows_path, run_dir / "config.json", run_dir / FILE,
                                           run_dir / "artifacts" / "index.json") if p.exists()]
    stamps += [p.stat().st_mtime for p in (run_dir / "checkpoints").glob("*.pt")]
    status.last_progress = max(stamps, default=None)
    if status.state == "partial" and status.planned is not None and (
            status.learned >= status.planned):
        status.state = "done"
    return status


def _decide(status: RunStatus, record: dict | None) -> RunStatus:
    """Not a run or damaged first, then the lock (running), then tasks (done), then the
    job's record (failed), else partial. A record that is not a finished job's (damaged, or
    without its end) is named in the note and not used."""
    problem = _record_problem(record) if record is not None else None
    if problem:
        status.note, record = f"job record ignored: {problem}", None
    if status.state in ("not-run", "damaged"):
        return status
    if status.run_dir is not None and is_locked(status.run_dir):
        status.state = "running"
    elif status.state == "done":
        pass
    elif record and record.get("state") == "failed" and (
            status.last_progress is None or status.last_progress <= record["ended"] + 1):
        status.state = "failed"
        status.error, status.log = record.get("error"), record.get("log")
    elif status.run_dir is None:
        status.state = "missing"
    if record and status.state in ("partial", "running") and record.get("log"):
        status.log = record["log"]
    return status


def _record_problem(record: dict) -> str | None:
    """Why a job record cannot be used (not as :mod:`benchmarks.exec.launch.job` writes it), or
    None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a job record"
    if "damaged" in record:
        return str(record["damaged"])
    if record.get("state") not in JOB_STATES:
        return f"state {record.get('state')!r} is none of {JOB_STATES}"
    if not isinstance(record.get("ended"), int | float):
        return "no end time (the job's record was cut short)"
    if not isinstance(record.get("key"), str):
        return "no job key"
    return None


def job_status(out: str | Path, job: Job) -> RunStatus:
    from benchmarks.exec.records import read_record

    run_dir = find_run_dir(out, job)
    status = folder_progress(run_dir) if run_dir is not None else RunStatus(job.key, "missing")
    status.name = job.key
    return _decide(status, read_record(out, job.key))


def _json_or_none(path: Path) -> dict | None:
    """A job record, or None when absent; a damaged one as ``{"damaged": why}`` (named in
    the run's line by :func:`_decide`)."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return {"damaged": f"unreadable {path.name} ({type(err).__name__})"}
    return record if isinstance(record, dict) else {"damaged": f"{path.name} is a JSON "
                                                               f"{type(record).__name__}"}


def folder_statuses(out: str | Path) -> list[RunStatus]:
    """Every run folder under ``out`` (no plan: nothing can be missing), plus failed jobs
    that never made a folder."""
    out = Path(out).expanduser()
    found, seen = [], set()
    for config in sorted(out.glob("*/config.json")):
        job = _json_or_none(config.parent / "job.json")
        seen.add((job or {}).get("key"))
        found.append(_decide(folder_progress(config.parent), job))
    for path in sorted((sweep_dir(out) / "jobs").glob("*.json")):
        record = _json_or_none(path) or {}
        if record.get("key") not in seen and record.get("state") == "failed" and (
                _record_problem(record) is None):
            found.append(_decide(RunStatus(record["key"], "missing"), record))
    return found


def report(statuses: list[RunStatus]) -> str:
    counts = {s: sum(r.state == s for r in statuses) for s in STATES}
    lines = [r.line() for r in statuses]
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no runs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.exec.plan import add_launcher_arguments
    from benchmarks.exec.runs import CLI_ERRORS, add_run_arguments

    p = argparse.ArgumentParser(prog="python -m benchmarks.status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=None,
                   help="the folder of run folders (default: --out of the plan flags, else "
                        "results/runs)")
    args, plan_flags = p.parse_known_args(argv)
    run_parser = argparse.ArgumentParser(prog=p.prog)  # its errors name this command
    add_run_arguments(run_parser)
    add_launcher_arguments(run_parser)
    run_args = run_parser.parse_args(plan_flags)  # the sweep's own flags (launcher's too)
    results = args.results or run_args.out
    if not Path(results).is_dir() and not plan_flags:
        print(f"error: {results} is not a folder of run folders", file=sys.stderr)
        return 2
    if plan_flags:  # a sweep not started yet (no folder): every planned run is missing
        from benchmarks.exec.plan import plan_jobs

        run_args.out = results
        try:
            statuses = [job_status(results, j) for j in plan_jobs(run_args)]
        except CLI_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        statuses = folder_statuses(results)
    print(report(statuses))
    runs = [s for s in statuses if s.state != "not-run"]
    return 0 if runs and all(s.state == "done" for s in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
