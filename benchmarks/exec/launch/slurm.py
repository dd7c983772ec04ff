"""The SLURM launcher: one array task per run, through submitit.

Settings come from ``--slurm-config FILE`` (JSON: ``partition``, ``time``, ``gpus``, ``cpus``,
``mem_gb``, ``parallelism``, ``sbatch`` (a dict of any other sbatch options), ``setup`` (shell
lines run before the job, e.g. ``module load``)) and the flags of the same names, which
override the file. They are recorded in every job's record and run folder (``job.json``).

Each array task runs :func:`benchmarks.exec.launch.job.run_job` in-process, wrapped in
:class:`RunJob`, a submitit ``Checkpointable``: on timeout (SLURM's warning signal, sent
``signal_delay_s`` before the limit) or preemption submitit calls ``checkpoint``, which
resubmits the same job; the requeued job resumes from the run folder (store + the last phase
checkpoint), as any relaunch does. The old process's run lock dies with it. Requeues stop
after ``--max-requeue`` timeouts (preemptions are not counted by submitit).

Logs: ``<out>/.sweep/slurm/<array id>_<index>_0_log.{out,err}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

from benchmarks.core.checks import Range
from benchmarks.exec.launch.job import run_job
from benchmarks.exec.sweep import AT_LEAST_ONE, GPUS, MEM_GB, Job, sweep_dir

try:
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # the 'cluster' extra is not installed: everything else works
    submitit = None
    Checkpointable = object  # type: ignore[assignment,misc]

REPO = Path(__file__).resolve().parent.parent.parent.parent
CONFIG_KEYS = ("partition", "time", "gpus", "cpus", "mem_gb", "parallelism", "sbatch", "setup")


# sbatch --time's forms (its man page): minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME_FORMS = (r"(?P<m>\d+)", r"(?P<m>\d+):(?P<s>\d+)", r"(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)",
               r"(?P<d>\d+)-(?P<h>\d+)", r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)",
               r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)")
TIME = Range(1, None, "minutes per run: SLURM reads 0 as no limit, which a requeue on "
             "timeout cannot use", integer=True)
# The other settings' ranges: those of their flags (benchmarks.exec.launch).
RANGES = {"gpus": GPUS, "cpus": AT_LEAST_ONE, "mem_gb": MEM_GB, "parallelism": AT_LEAST_ONE}


def minutes(value: str | int | float) -> int:
    """SLURM time in sbatch's forms (minutes, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``)
    -> whole minutes (rounded up); ``ValueError`` for another form, a field past its unit
    (``25:99``), or less than a minute."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"--time {value!r}: give minutes or [D-]HH:MM[:SS]")
    if isinstance(value, int | float):
        return TIME.check("--time", value)
    text = value.strip()
    match = next((m for form in _TIME_FORMS if (m := re.fullmatch(form, text))), None)
    if match is None:
        raise ValueError(f"--time {value!r}: give minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]] "
                         f"(sbatch's forms)")
    parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    # a leading field is unbounded (90 minutes, 30 hours); one after a colon is below 60
    limits = {"h": 24 if "d" in parts else None, "m": 60 if "h" in parts else None, "s": 60}
    for unit, limit in limits.items():
        if limit is not None and parts.get(unit, 0) >= limit:
            raise ValueError(f"--time {value!r}: {parts[unit]} is past its unit (< {limit}); "
                             f"give minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    total = (parts.get("d", 0) * 1440 + parts.get("h", 0) * 60 + parts.get("m", 0)
             + (1 if parts.get("s") else 0))
    return TIME.check("--time", total)


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The array's settings: ``--slurm-config`` overridden by the flags given."""
    conf: dict[str, Any] = {}
    if args.slurm_config:
        path = Path(args.slurm_config).expanduser()
        try:
            conf = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--slurm-config {path}: {err}") from err
        unknown = set(conf) - set(CONFIG_KEYS)
        if unknown:
            raise ValueError(f"--slurm-config {path}: unknown keys {sorted(unknown)}; "
                             f"valid: {', '.join(CONFIG_KEYS)}")
    flags = {"partition": args.partition, "time": args.time, "gpus": args.slurm_gpus,
             "cpus": args.slurm_cpus, "mem_gb": args.mem_gb, "parallelism": args.parallelism}
    conf |= {k: v for k, v in flags.items() if v is not None}
    extra = dict(conf.get("sbatch", {}))
    for item in args.sbatch or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--sbatch takes KEY=VALUE, got {item!r}")
        extra[key.lstrip("-").replace("-", "_")] = value
    conf["sbatch"] = extra
    for key, rule in RANGES.items():  # a --slurm-config value as its flag's would be
        if key in conf:
            rule.check(f"slurm {key}", conf[key])
    conf["time"] = minutes(conf.get("time", 60))
    conf["max_requeue"] = args.max_requeue
    return conf


class RunJob(Checkpointable):
    """One array task: run one job; on timeout or preemption, submit the same job again."""

    def __init__(self, out: str, settings: dict[str, Any]) -> None:
        self.out, self.settings = out, settings

    def __call__(self, job: Job) -> int:
        log = None
        with contextlib.suppress(RuntimeError):  # RuntimeError: not inside a submitit job
            log = str(submitit.JobEnvironment().paths.stderr)
        code = run_job(job, self.out, log, {"launcher": "slurm", **self.settings})
        if code:
            raise SystemExit(code)  # the array task fails visibly in sacct
        return code

    # checkpoint(): Checkpointable's own returns DelayedSubmission(self, job), i.e. the same
    # job again; the harness resumes it from its run folder.


def executor_for(out: str, settings: dict[str, Any], n_jobs: int):
    if submitit is None:
        raise ValueError("--launcher slurm needs submitit: pip install 'nws-bench[cluster]'")
    folder = sweep_dir(out) / "slurm"
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise ValueError("--launcher slurm: no sbatch/srun on PATH; run this on a SLURM login "
                         "node (--dry-run prints the plan anywhere)")
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=settings["max_requeue"])
    params: dict[str, Any] = {"job_name": "nws-bench", "time": settings["time"],
                              "array_parallelism": settings.get("parallelism", n_jobs),
                              "additional_parameters": settings["sbatch"]}
    for key, name in (("partition", "partition"), ("gpus", "gpus_per_node"),
                      ("cpus", "cpus_per_task")):
        if settings.get(key) is not None:
            params[name] = settings[key]
    # the job unpickles benchmarks.exec.launch.slurm.RunJob: this checkout first on its path
    params["setup"] = [f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
                       *settings.get("setup", [])]
    if settings.get("mem_gb") is not None:
        params["mem"] = f"{int(settings['mem_gb'] * 1024)}M"
    ex.update_parameters(**params)
    return ex


def launch_slurm(jobs: list[Job], args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.threads is None and settings.get("cpus"):  # a job's threads: its CPUs
        jobs = [j.with_config(threads=settings["cpus"]) for j in jobs]
    ex = executor_for(args.out, settings, len(jobs))
    submitted = ex.map_array(RunJob(args.out, settings), jobs)
    folder = sweep_dir(args.out) / "slurm"
    print(f"slurm: submitted {len(submitted)} array tasks "
          f"(at most {settings.get('parallelism', len(jobs))} at once, {settings['time']} min "
          f"each); logs in {folder}/<job id>_0_log.out|err")
    for job, sj in zip(jobs, submitted, strict=True):
        print(f"  {sj.job_id:<14} {job.key}")
    print(f"follow with: python -m benchmarks.status --results {args.out}")
    return 0
