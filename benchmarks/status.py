"""Where a sweep stands, from its run folders alone.

    python -m benchmarks.status --results results/runs                      # every run folder
    python -m benchmarks.status --method all --benchmark split_cifar100 --protocol paper \\
        --out results/runs          # a planned sweep: the same flags as its benchmarks.run

Each run is one of:

- ``done``: every planned task has its accuracy row;
- ``running``: a live process holds the run folder's lock (:mod:`benchmarks.lock`); with
  the last epoch trained and its mean loss (``epochs.csv``, :mod:`benchmarks.epoch_log`),
  also shown for ``partial`` runs;
- ``partial``: a folder with fewer tasks learned than planned, and no live holder (killed,
  waiting for a requeue, or never launched again), with the time of its last progress (the
  newest of rows, checkpoints and store index);
- ``failed``: its last job ended with an error and nothing progressed since: the last error
  line and the job's log (``.sweep/jobs/<key>.json``, written by :mod:`benchmarks.launch.job`);
- ``missing``: planned, but no run folder (only with plan flags).

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

from benchmarks.epoch_log import FILE, read_epochs
from benchmarks.lock import is_locked
from benchmarks.results import COLUMNS, read_rows
from benchmarks.sweep import Job, find_run_dir, sweep_dir

STATES = ("done", "running", "partial", "failed", "missing")


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
    last_epoch: dict | None = None  # the last row of epochs.csv (benchmarks.epoch_log)

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
        return " | ".join(parts)


def folder_progress(run_dir: Path) -> RunStatus:
    """Tasks learned / planned, mean accuracy after the last learned task and the time of the
    last progress of one run folder (its state: done or partial; see :func:`job_status`)."""
    status = RunStatus(run_dir.name, "partial", run_dir)
    try:
        status.planned = len(json.loads((run_dir / "config.json").read_text())["tasks"])
    except (OSError, ValueError, KeyError):
        status.planned = None
    rows_path = run_dir / "rows.csv"
    try:
        rows = read_rows(rows_path)
    except ValueError as err:
        rows, status.error = pd.DataFrame(columns=COLUMNS), str(err)
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
    if status.planned is not None and status.learned >= status.planned:
        status.state = "done"
    return status


def _decide(status: RunStatus, record: dict | None) -> RunStatus:
    """Lock first (running), then tasks (done), then the job's record (failed), else
    partial."""
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


def job_status(out: str | Path, job: Job) -> RunStatus:
    from benchmarks.launch.job import read_record

    run_dir = find_run_dir(out, job)
    status = folder_progress(run_dir) if run_dir is not None else RunStatus(job.key, "missing")
    status.name = job.key
    return _decide(status, read_record(out, job.key))


def _json_or_none(path: Path) -> dict | None:
    """A job record, or None when absent or damaged (status reports what it can read)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def folder_statuses(out: str | Path) -> list[RunStatus]:
    """Every run folder under ``out`` (no plan: nothing can be missing), plus failed jobs
    that never made a folder."""
    out = Path(out).expanduser()
    found, seen = [], set()
    for config in sorted(out.glob("*/config.json")):
        job = _json_or_none(config.parent / "job.json") or {}
        seen.add(job.get("key"))
        found.append(_decide(folder_progress(config.parent), job or None))
    for path in sorted((sweep_dir(out) / "jobs").glob("*.json")):
        record = _json_or_none(path) or {}
        if record.get("key") not in seen and record.get("state") == "failed":
            found.append(_decide(RunStatus(record["key"], "missing"), record))
    return found


def report(statuses: list[RunStatus]) -> str:
    counts = {s: sum(r.state == s for r in statuses) for s in STATES}
    lines = [r.line() for r in statuses]
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no runs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from benchmarks import run as cli

    p = argparse.ArgumentParser(prog="python -m benchmarks.status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=None,
                   help="the folder of run folders (default: --out of the plan flags, else "
                        "results/runs)")
    args, plan_flags = p.parse_known_args(argv)
    run_parser = cli.parser()
    run_parser.prog = p.prog  # its errors name this command
    run_args = run_parser.parse_args(plan_flags)  # the sweep's own flags (launcher's too)
    results = args.results or run_args.out
    if not Path(results).is_dir() and not plan_flags:
        print(f"error: {results} is not a folder of run folders", file=sys.stderr)
        return 2
    if plan_flags:  # a sweep not started yet (no folder): every planned run is missing
        from benchmarks.launch import plan_jobs

        run_args.out = results
        try:
            statuses = [job_status(results, j) for j in plan_jobs(run_parser, run_args)]
        except cli.CLI_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        statuses = folder_statuses(results)
    print(report(statuses))
    return 0 if statuses and all(s.state == "done" for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
