"""The conformance check's runs (:mod:`benchmarks.perf.conformance`), each in a fresh process.

A job is one :func:`benchmarks.engine.harness.run` of a method spec, in a process of its own
(``python -m benchmarks.perf.conformance_runs JOB.json``), optionally

- *recording*: every model the method's ``load_task`` returns (the models the harness
  evaluates) gives its logits on a fixed batch (:func:`fixed_batch`), saved per task, the
  last call of each task winning (the final models);
- *killed*: the process SIGKILLs itself after its N-th optimiser step (counted in the
  method's ``after_step``, so the count is the harness's steps, every phase included).

Both are done by wrapping the method class's own hooks in the job's process only, so the
harness runs unchanged and the check needs nothing from its internals. A fresh process per
job is the point: a method keeping state outside the store (in its instance, its class, a
module global) cannot carry it into a job that only reads the store.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine.harness import RunConfig, run
from benchmarks.methods.table import METHODS

MODULE = "benchmarks.perf.conformance_runs"
BATCH = 4  # images in the fixed batch
BATCH_SEED = 0


def fixed_batch(size: int) -> torch.Tensor:
    """``(BATCH, 3, size, size)`` standard-normal images from a fixed seed: the same tensor
    in every process (a CPU generator)."""
    g = torch.Generator().manual_seed(BATCH_SEED)
    return torch.randn(BATCH, 3, size, size, generator=g)


@torch.no_grad()
def logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The logits of a copy of ``model`` in eval mode on CPU (the model itself is left as it
    was, so the harness evaluates what it would have evaluated)."""
    probe = copy.deepcopy(model).cpu().eval()
    return probe(batch).float()


def record_load_task(cls: type, batch: torch.Tensor, into: dict[int, torch.Tensor]) -> None:
    """Wrap ``cls.load_task`` (this process only): each returned model's logits go to
    ``into[task index]``."""
    load_task = cls.load_task

    def recording(self, task, store):
        model = load_task(self, task, store)
        into[task.index] = logits(model, batch)
        return model

    cls.load_task = recording


def kill_after_steps(cls: type, steps: int) -> None:
    """Wrap ``cls.after_step`` (this process only): SIGKILL this process after the
    ``steps``-th optimiser step (after the method's own ``after_step``)."""
    after_step, count = cls.after_step, [0]

    def counting(self, model):
        after_step(self, model)
        count[0] += 1
        if count[0] >= steps:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    cls.after_step = counting


@dataclass
class Job:
    """One run in a process of its own. ``record``: file for the recorded logits (with
    ``image_size``); ``kill_after``: SIGKILL after that many optimiser steps."""

    spec: str
    config: dict[str, Any]  # a RunConfig as a dict
    record: str | None = None
    image_size: int = 0
    kill_after: int | None = None

    def start(self, folder: Path, name: str, timeout: float | None = None
              ) -> subprocess.CompletedProcess:
        """Run the job in a fresh interpreter (this process's import path passed on, so it
        resolves the same spec); its output is returned, not printed, and kept in
        ``folder/<name>.log``."""
        path = folder / f"{name}.job.json"
        path.write_text(json.dumps(asdict(self)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        proc = subprocess.run([sys.executable, "-m", MODULE, str(path)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        (folder / f"{name}.log").write_text(proc.stdout + proc.stderr)
        return proc


def run_job(job: Job) -> Path:
    """The job's run, in this process (``python -m`` entry)."""
    recorded: dict[int, torch.Tensor] = {}
    cls = METHODS.get(job.spec)
    if job.record:
        record_load_task(cls, fixed_batch(job.image_size), recorded)
    if job.kill_after is not None:
        kill_after_steps(cls, job.kill_after)
    run_dir = run(RunConfig(**job.config))
    if job.record:
        torch.save(recorded, job.record)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    job = Job(**json.loads(Path(args[0]).read_text()))
    print(run_job(job), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
