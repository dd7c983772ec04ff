"""Launchers: place the jobs of a sweep plan (:mod:`benchmarks.exec.sweep`), one run per job.

- ``inline`` (default): every run in this process, one after the other (``benchmarks.run``).
- ``local``: N processes on this machine (:mod:`benchmarks.exec.launch.local`).
- ``slurm``: one SLURM array task per run through submitit (:mod:`benchmarks.exec.launch.slurm`).

A launcher knows jobs (command lines), never methods; each job is the same
``benchmarks.run`` call an inline run makes, so the harness never knows how it was started.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.exec.plan import LAUNCHERS, plan_jobs
from benchmarks.exec.sweep import job_table

__all__ = ["LAUNCHERS", "launch", "plan_jobs"]


def launch(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Plan, then print (``--dry-run``) or place the jobs with ``--launcher``. Raises
    ``ValueError`` (CLI exit 2) for a bad plan, ``WeightsUnavailableError`` for a weights
    file that is not there or does not fit ``--arch`` (counts: their flags' ranges)."""
    source = args.weights or args.pretrained
    if source not in (None, "imagenet", "none"):  # every job would stop on a bad file
        from benchmarks.models.archs import Pretrained

        Pretrained(args.arch, str(Path(source).expanduser()))  # WeightsUnavailableError
    if args.launcher == "local":  # its jobs see this machine's devices (not so on SLURM)
        from benchmarks.core.device_policy import resolve_device

        resolve_device(args.device)
        from benchmarks.exec.launch.local import gpus_from

        gpus_from(args)  # ValueError for --gpus that are not visible here
    jobs = plan_jobs(args)
    if args.dry_run:
        print(f"{len(jobs)} runs, launcher {args.launcher}; results in {args.out}")
        print(job_table(jobs))
        if args.launcher == "slurm":
            from benchmarks.exec.launch.slurm import settings_from

            print(f"slurm settings: {settings_from(args)}")
        return 0
    return LAUNCHERS.get(args.launcher)(jobs, args)
