"""A ``benchmarks.run`` command line as a sweep plan: one job per (seed, method), each
job's run configuration with every path made absolute (a job may start in another folder,
on another node), and the launcher flags that place them. Used by the launchers
(:mod:`benchmarks.exec.launch`) and by :mod:`benchmarks.exec.status` (which plans the sweep
it reports on, and never launches)."""

from __future__ import annotations

import argparse

from benchmarks.core.checks import flag_type
from benchmarks.core.registry import Registry
from benchmarks.exec.runs import run_configs
from benchmarks.exec.sweep import AT_LEAST_ONE, GPUS, MEM_GB, REQUEUES, Job, plan

__all__ = ["LAUNCHERS", "add_launcher_arguments", "plan_jobs"]

# The launchers by name (each module imported only when chosen: benchmarks.exec.launch).
LAUNCHERS: Registry = Registry("launcher")
LAUNCHERS.register("local", "benchmarks.exec.launch.local:launch_local",
                   "N concurrent processes on this machine (--jobs N, or --per-gpu K)")
LAUNCHERS.register("slurm", "benchmarks.exec.launch.slurm:launch_slurm",
                   "a SLURM job array through submitit, requeued on timeout or preemption")


def add_launcher_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launcher", "how the runs are placed (never passed to a run)")
    g.add_argument("--launcher", default="inline", choices=["inline", *LAUNCHERS.names()],
                   help="inline: here, one run after the other (default); local: N processes; "
                        "slurm: a job array")
    g.add_argument("--dry-run", action="store_true", help="print the job table and exit")
    g.add_argument("--jobs", type=flag_type(int, AT_LEAST_ONE), default=None,
                   help="local: concurrent runs (default 1, or the GPU slots of --per-gpu)")
    g.add_argument("--per-gpu", type=flag_type(int, AT_LEAST_ONE), default=None,
                   help="local: runs packed onto each GPU (pinned with CUDA_VISIBLE_DEVICES)")
    g.add_argument("--gpus", default=None,
                   help="local: physical GPU ids to pin runs to, e.g. 0,1 (as "
                        "CUDA_VISIBLE_DEVICES takes them; each must be visible here); "
                        "default with --per-gpu: $CUDA_VISIBLE_DEVICES or every visible GPU; "
                        "alone: --per-gpu 1")
    s = p.add_argument_group("slurm", "the SLURM array (flags override --slurm-config)")
    s.add_argument("--slurm-config", default=None,
                   help="JSON file with any of: partition, time, gpus, cpus, mem_gb, "
                        "parallelism, sbatch (dict), setup (list of shell lines)")
    s.add_argument("--partition", default=None)
    s.add_argument("--time", default=None,
                   help="per run: minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]], as sbatch reads "
                        "them (default 60; a run past it is requeued and resumes)")
    s.add_argument("--gpus-per-job", dest="slurm_gpus", type=flag_type(int, GPUS), default=None)
    s.add_argument("--cpus-per-job", dest="slurm_cpus", type=flag_type(int, AT_LEAST_ONE),
                   default=None)
    s.add_argument("--mem-gb", type=flag_type(float, MEM_GB), default=None)
    s.add_argument("--parallelism", type=flag_type(int, AT_LEAST_ONE), default=None,
                   help="array tasks running at once (%%N)")
    s.add_argument("--sbatch", action="append", metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --sbatch account=abc --sbatch qos=high")
    s.add_argument("--max-requeue", type=flag_type(int, REQUEUES), default=3,
                   help="requeues on timeout before a run is left partial")


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """The sweep of a ``benchmarks.run`` command line, one job per (seed, method)."""
    return plan(run_configs(args))
