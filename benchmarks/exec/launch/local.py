"""The local launcher: the jobs of a sweep as concurrent processes on this machine.

``--jobs N``: N runs at once (CPU, or whatever ``--device`` says). ``--per-gpu K``: K runs per
GPU, each pinned to its GPU with ``CUDA_VISIBLE_DEVICES`` (so ``--device auto`` finds exactly
one). ``--gpus``: physical GPU ids, as ``CUDA_VISIBLE_DEVICES`` takes them (this machine's
ids, not indices into the launcher's own ``$CUDA_VISIBLE_DEVICES``), each checked against
the GPUs this process sees (:func:`visible_gpus`); each job starts on the GPU running the
fewest jobs (:func:`pick_slot`). Each job gets ``cores // slots`` threads unless
``--threads`` is given (torch's, and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set before it
starts), its own log ``<out>/.sweep/logs/<key>.log``, and prints one line when it ends, with
an ETA for the sweep (mean time of the finished jobs x jobs left / slots). Ctrl-C, SIGTERM or
SIGHUP to the launcher stops every job (each resumes from its run folder when launched
again). Exit status: 0 if every job finished, else 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.exec.launch.job import job_command
from benchmarks.exec.records import read_record, write_record
from benchmarks.exec.sweep import Job, sweep_dir
from nws.atomic import storage_error

REPO = Path(__file__).resolve().parent.parent.parent.parent


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def visible_gpus() -> list[str]:
    """The physical ids of the GPUs this process may use: ``$CUDA_VISIBLE_DEVICES``'s entries
    (as CUDA reads them: up to the first negative one, e.g. ``-1`` hides every GPU; at most
    as many as torch counts), else ``0 .. torch.cuda.device_count() - 1``. An entry may be
    a UUID (``GPU-...``) or a MIG id; it is passed on as written."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    ids: list[str] = []
    for entry in (e.strip() for e in listed.split(",")):
        if not entry or entry.startswith("-"):
            break
        ids.append(entry)
    return ids[:count]


def gpus_from(args: argparse.Namespace) -> list[str] | None:
    """The GPUs ``--per-gpu``/``--gpus`` ask for (physical ids), checked against
    :func:`visible_gpus`; None when jobs are not pinned. ``--gpus`` alone means
    ``--per-gpu 1``. Raises ``ValueError`` (exit 2) for an empty or negative id, a repeated
    one, one not visible here (naming the visible ones), or ``--per-gpu`` with no GPU."""
    if args.per_gpu is None and args.gpus is None:
        return None
    visible = visible_gpus()
    where = (f"visible here (physical ids): {', '.join(visible)}" if visible else
             "no GPU is visible here")
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        where += f" ($CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})"
    if args.gpus is None:
        if not visible:
            raise ValueError(f"--per-gpu: {where}; use --jobs N for CPU runs")
        return visible
    ids = [g.strip() for g in args.gpus.split(",")]
    if not all(ids) or any(g.startswith("-") for g in ids):
        raise ValueError(f"--gpus {args.gpus!r}: give physical GPU ids, e.g. --gpus 0,1 "
                         f"({where}); for CPU runs use --jobs N without --gpus/--per-gpu")
    if len(set(ids)) < len(ids):
        raise ValueError(f"--gpus {args.gpus}: an id is repeated; use --per-gpu K for K runs "
                         f"per GPU")
    missing = [g for g in ids if g not in visible]
    if missing:
        raise ValueError(f"--gpus {args.gpus}: GPU {', '.join(missing)} not visible; {where}")
    return ids


def slots_for(args: argparse.Namespace) -> list[str | None]:
    """One entry per concurrent job: the GPU (physical id) it is pinned to, or None (no
    pinning). GPUs take turns (``0, 1, 0, 1`` for two GPUs and ``--per-gpu 2``), so that
    ``--jobs`` fewer than the slots still spreads over every GPU."""
    gpus = gpus_from(args)
    if gpus is None:
        return [None] * (args.jobs or 1)
    slots = [g for _ in range(args.per_gpu or 1) for g in gpus]
    return slots[: args.jobs] if args.jobs else slots


def pick_slot(free: list[int], slots: list[str | None], busy: list[int]) -> int:
    """The free slot to start the next job in: on the GPU running the fewest jobs (ties:
    the earliest slot); removed from ``free``. ``busy``: the slots of running jobs."""
    def load(slot: int) -> tuple[int, int]:
        return sum(slots[b] == slots[slot] for b in busy), slot

    chosen = min(free, key=load)
    free.remove(chosen)
    return chosen


# Signals that stop the launcher like Ctrl-C: its jobs run in their own sessions (so a
# terminal's Ctrl-C reaches only the launcher), so a launcher ended by `kill` or a closed
# terminal must stop them itself or they run on, orphaned.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    slot: int
    log: Path
    started: float


def launch_local(jobs: list[Job], args: argparse.Namespace) -> int:
    slots = slots_for(args)
    threads = args.threads or max(1, (os.cpu_count() or 1) // len(slots))
    logs = sweep_dir(args.out) / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a read-only or full disk: exit 2 naming it (benchmarks.run)
        raise storage_error(logs, err, "cannot create the sweep's log folder") from err
    settings = {"launcher": "local", "slots": len(slots), "threads": threads,
                "gpus": sorted({s for s in slots if s is not None})}
    print(f"local: {len(jobs)} runs, {len(slots)} at once, {threads} threads each; logs in "
          f"{logs}", flush=True)
    pending, running, free = list(jobs), [], list(range(len(slots)))
    durations, failed, sweep_start = [], 0, time.time()
    previous = {sig: signal.signal(sig, _interrupt) for sig in _STOP_SIGNALS}
    try:
        while pending or running:
            while pending and free:
                job = pending.pop(0)
                slot = pick_slot(free, slots, [r.slot for r in running])
                log = logs / f"{job.key}.log"
                env = os.environ | {"OMP_NUM_THREADS": str(threads),
                                    "MKL_NUM_THREADS": str(threads),
                                    "PYTHONPATH": os.pathsep.join(
                                        filter(None, [str(REPO),
                                                      os.environ.get("PYTHONPATH")]))}
                if slots[slot] is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slots[slot]
                if args.threads is None:
                    job = job.with_config(threads=threads)
                cmd = job_command(job, args.out, str(log), settings | {"gpu": slots[slot]})
                with open(log, "ab") as fh:
                    fh.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                             f"{job.command_text()}\n".encode())
                    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                            cwd=REPO, start_new_session=True)
                running.append(_Running(job, proc, slot, log, time.time()))
            time.sleep(0.2)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                free.append(r.slot)
                seconds = time.time() - r.started
                durations.append(seconds)
                failed += _report(r, seconds, args.out)
                left = len(pending) + len(running)
                done = len(jobs) - left
                eta = (sum(durations) / len(durations)) * left / len(slots) if left else 0
                print(f"[{done}/{len(jobs)}] " + _last_line(r, seconds, args.out)
                      + (f" | {left} left, ETA {_clock(eta)}" if left else
                         f" | sweep took {_clock(time.time() - sweep_start)}"), flush=True)
    except KeyboardInterrupt:
        for r in running:
            os.killpg(r.proc.pid, signal.SIGTERM)
        for r in running:
            r.proc.wait()
        print("stopped; launch again to resume every run from its folder", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    from benchmarks.exec.runs import summarise
    from benchmarks.exec.sweep import find_run_dir

    run_dirs = [d for d in (find_run_dir(args.out, j) for j in jobs)
                if d is not None and (d / "rows.csv").exists()]
    if run_dirs:
        print()
        print(summarise(run_dirs))
    return 1 if failed else 0


def _report(r: _Running, seconds: float, out: str) -> int:
    """Record a job that died without recording (a signal); returns 1 if it failed."""
    code = r.proc.returncode
    if code < 0:
        record = read_record(out, r.job.key)
        if record is None or record.get("ended", 0) < r.started:
            write_record(out, r.job, "failed", error=f"killed by signal {-code}",
                         log=str(r.log), started=r.started)
    return int(code != 0)


def _last_line(r: _Running, seconds: float, out: str) -> str:
    from benchmarks.exec.status import job_status

    status = job_status(out, r.job)
    what = f"{r.job.method} s{r.job.seed} {status.state} in {_clock(seconds)}"
    if status.planned is not None:
        what += f": {status.learned}/{status.planned} tasks"
    if status.mean_accuracy is not None:
        what += f", mean acc {status.mean_accuracy:.1%}"
    if r.proc.returncode != 0:
        what += f" (exit {r.proc.returncode}{'; ' + status.error if status.error else ''};" \
                f" log {r.log})"
    return what
