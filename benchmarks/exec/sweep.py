"""A sweep plan: the runs of one command as data, one :class:`Job` per (method, seed).

The plan is the cross product of the methods and seeds given, on the benchmark, architecture
and protocol given. Each job carries the :class:`RunConfig` of exactly one run as data (JSON
between processes), so every launcher places the same thing and the harness never learns how
it was started; the one-run ``benchmarks.run`` command line it stands for
(:meth:`RunConfig.to_argv`) is shown, never parsed back.

A sweep keeps its bookkeeping beside the run folders, in ``<out>/.sweep/`` (analysis reads
only ``rows.csv`` files, so it never sees it)::

    .sweep/jobs/<key>.json   the last finished attempt of a job: done / failed, the error line,
                             the log path, the launcher's settings (also copied to the run
                             folder as ``job.json``)
    .sweep/logs/<key>.log    stdout and stderr of a local job
    .sweep/slurm/            submitit's folder: batch scripts, pickled jobs, SLURM logs

A planned job is matched to its run folder by the run configuration the harness writes into
``config.json`` (:data:`MATCH_FIELDS`), never by guessing the folder's name: the folder's hash
depends on options the harness resolves.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.core.checks import Range
from benchmarks.core.identity import folder_safe
from benchmarks.engine.run_config import RunConfig

SWEEP_DIR = ".sweep"
MATCH_FIELDS = ("method", "seed", "benchmark", "arch", "protocol", "num_tasks", "pretrained",
                "method_options", "protocol_overrides", "benchmark_options", "deterministic")


# Valid ranges of the launcher's count flags (benchmarks.core.checks), given to their parsers.
AT_LEAST_ONE = Range(1, None, "a count of jobs, runs, GPUs' slots or CPUs: at least one",
                     integer=True)
GPUS = Range(0, None, "GPUs per job: 0 runs on the CPU", integer=True)
REQUEUES = Range(0, None, "requeues after a timeout: 0 leaves a timed-out run partial",
                 integer=True)
MEM_GB = Range(0, None, "memory per job in GB: more than none", lo_open=True)


def _json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


@dataclass(frozen=True)
class Job:
    """One run: its key (file names), the fields that identify its run folder, and its run
    configuration (:meth:`RunConfig.to_dict`)."""

    key: str
    method: str
    seed: int
    match: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    def run_config(self) -> RunConfig:
        return RunConfig.from_dict(self.config)

    def with_config(self, **changes: Any) -> Job:
        """This job with its configuration's fields ``changes`` set (not its identity: the
        launcher's threads, say)."""
        return replace(self, config=self.config | changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**json.loads(text))

    def argv(self) -> list[str]:
        """The ``benchmarks.run`` flags of this one run."""
        return self.run_config().to_argv() if self.config else []

    def command_text(self) -> str:
        return shlex.join(["python", "-m", "benchmarks.run", *self.argv()])


def job_for(cfg: RunConfig) -> Job:
    """The job of ``cfg``: named (key, log file, status line) by the method's ``name``, as
    its run folder is; its configuration keeps the spec it was given (``pkg.mod:Class``)."""
    from benchmarks.methods.table import METHODS

    match = _json({k: asdict(cfg)[k] for k in MATCH_FIELDS})
    digest = hashlib.sha256(json.dumps(match, sort_keys=True).encode()).hexdigest()[:8]
    name = METHODS.get(cfg.method).name
    key = folder_safe(f"{cfg.benchmark}-{name}-{cfg.arch}-{cfg.protocol}-s{cfg.seed}-{digest}")
    # a job's output is a log: no bars
    return Job(key, name, cfg.seed, match, replace(cfg, progress=False).to_dict())


def plan(configs: list[RunConfig]) -> list[Job]:
    return [job_for(cfg) for cfg in configs]


def job_table(jobs: list[Job]) -> str:
    """The plan as a table: one line per job, with its command."""
    width = max((len(j.key) for j in jobs), default=3)
    lines = [f"{'#':>3}  {'job':<{width}}  command"]
    lines += [f"{i:>3}  {j.key:<{width}}  {j.command_text()}" for i, j in enumerate(jobs)]
    return "\n".join(lines)


def sweep_dir(out: str | Path) -> Path:
    return Path(out).expanduser().resolve() / SWEEP_DIR


def find_run_dir(out: str | Path, job: Job) -> Path | None:
    """The run folder under ``out`` whose ``config.json`` records ``job``'s run, if any."""
    for config in sorted(Path(out).expanduser().glob("*/config.json")):
        try:
            run_config = json.loads(config.read_text()).get("run_config", {})
        except (OSError, ValueError, AttributeError):  # unreadable, or not a run's (a list)
            continue
        if isinstance(run_config, dict) and {k: run_config.get(k) for k in MATCH_FIELDS} == (
                job.match):
            return config.parent
    return None
