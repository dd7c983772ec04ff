"""The local launcher: the jobs of a sweep as concurrent processes on this machine.

``--jobs N``: N runs at once (CPU, or whatever ``--device`` says). ``--per-gpu K``: K runs per
GPU, each pinned to its GPU with ``CUDA_VISIBLE_DEVICES`` (so ``--device auto`` finds exactly
one). Each job gets ``cores // slots`` threads unless ``--threads`` is given (torch's, and
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set before it starts), its own log
``<out>/.sweep/logs/<key>.log``, and prints one line when it ends, with an ETA for the sweep
(mean time of the finished jobs x jobs left / slots). Ctrl-C, SIGTERM or SIGHUP to the
launcher stops every job (each resumes from its run folder when launched again). Exit
status: 0 if every job finished, else 1.
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

from benchmarks.atomic import storage_error
from benchmarks.launch.job import job_command, read_record, write_record
from benchmarks.sweep import Job, sweep_dir

REPO = Path(__file__).resolve().parent.parent.parent


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def slots_for(args: argparse.Namespace) -> list[str | None]:
    """One entry per concurrent job: the GPU it is pinned to, or None (no pinning)."""
    if args.per_gpu is None:
        return [None] * (args.jobs or 1)
    gpus = args.gpus or os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpus:
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
    else:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
    if not ids:
        raise ValueError("--per-gpu: no GPU visible; give --gpus 0,1,... or use --jobs N")
    slots = [g for g in ids for _ in range(args.per_gpu)]
    return slots[: args.jobs] if args.jobs else slots


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
                job, slot = pending.pop(0), free.pop(0)
                log = logs / f"{job.key}.log"
                env = os.environ | {"OMP_NUM_THREADS": str(threads),
                                    "MKL_NUM_THREADS": str(threads),
                                    "PYTHONPATH": os.pathsep.join(
                                        filter(None, [str(REPO),
                                                      os.environ.get("PYTHONPATH")]))}
                if slots[slot] is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slots[slot]
                argv = list(job.argv)
                if args.threads is None:
                    argv += ["--threads", str(threads)]
                cmd = job_command(Job(job.key, job.method, job.seed, job.match, tuple(argv)),
                                  args.out, str(log), settings | {"gpu": slots[slot]})
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
    from benchmarks.run import summarise
    from benchmarks.sweep import find_run_dir

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
    from benchmarks.status import job_status

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
