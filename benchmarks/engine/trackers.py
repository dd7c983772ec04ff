"""Experiment trackers: ``--logger tensorboard|wandb|csv`` (repeatable).

One small interface the harness calls: :meth:`Tracker.epoch` after each training epoch (the
:class:`benchmarks.core.epoch_log.EpochRecord` also written to ``epochs.csv``),
:meth:`Tracker.task` after each task is evaluated (its result rows: the accuracy row of every
task learned so far, stored bytes, timings), :meth:`Tracker.close` at the run's end.

- ``csv``: ``epochs.csv`` and ``rows.csv`` in the run folder; always written, so naming it
  adds nothing (it is accepted so that a command can say so).
- ``tensorboard``: event files in ``<run folder>/tensorboard/`` (extra ``track``:
  ``pip install nws-bench[track]``); scalars ``train/loss``, ``train/lr``,
  ``train/images_per_s``, ``train/nonfinite_steps``, ``train/<figure>`` at the global
  epoch index, and ``accuracy/task<j>``, ``accuracy/mean``, ``memory/store_MiB`` at the
  task index.
- ``wandb``: one W&B run per suite run, named by the run id, files in
  ``<run folder>/wandb/``; offline (``WANDB_MODE=offline``, sync later with ``wandb sync``)
  unless an API key is set (``WANDB_API_KEY``, or ``WANDB_MODE`` set by the user).

Trackers never change a run's identity (they are not in ``config.json``'s ``identity``):
a run resumed with other ``--logger`` flags continues the same folder.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

from benchmarks.core.epoch_log import EpochRecord
from benchmarks.core.registry import Registry

EXTRA = "pip install 'nws-bench[track]'"


class MissingTrackerError(ValueError):
    """A tracker whose package is not installed (exit 2 before any run folder exists)."""


class Tracker:
    """The harness's per-epoch and per-task callbacks; every method is optional."""

    def __init__(self, run_dir: Path, run_id: str, config: dict[str, Any]) -> None:
        self.run_dir, self.run_id, self.config = run_dir, run_id, config
        self.epochs = 0  # epochs seen (the x axis of the per-epoch scalars)

    def epoch(self, record: EpochRecord) -> None:
        """After each training epoch."""

    def task(self, task: int, rows: list[dict[str, Any]]) -> None:
        """After task ``task`` is evaluated: its result rows (``metric``, ``task``, ``value``)."""

    def close(self) -> None:
        """At the run's end (also after an error)."""


def epoch_scalars(record: EpochRecord) -> dict[str, float]:
    """The per-epoch scalars a tracker shows (NaN figures left out)."""
    out = {"train/loss": record.loss, "train/lr": record.lr,
           "train/images_per_s": record.images_per_s,
           "train/nonfinite_steps": float(record.nonfinite_steps)}
    out |= {f"train/{k}": v for k, v in record.figures.items()}
    return {k: float(v) for k, v in out.items() if v is not None and not math.isnan(v)}


def task_scalars(task: int, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy of every task learned so far (percent), their mean, and the store's MiB."""
    acc = {int(r["task"]): 100 * float(r["value"]) for r in rows if r["metric"] == "accuracy"}
    out = {f"accuracy/task{j + 1}": v for j, v in sorted(acc.items())}
    if acc:
        out["accuracy/mean"] = sum(acc.values()) / len(acc)
    for r in rows:
        if r["metric"] == "store_bytes" and r["value"] is not None:
            out["memory/store_MiB"] = float(r["value"]) / 2**20
    return out


class CSVTracker(Tracker):
    """``epochs.csv`` and ``rows.csv`` are written for every run: nothing more to do."""


class TensorBoardTracker(Tracker):
    module = "tensorboard"

    def __init__(self, run_dir: Path, run_id: str, config: dict[str, Any]) -> None:
        super().__init__(run_dir, run_id, config)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def epoch(self, record: EpochRecord) -> None:
        for name, value in epoch_scalars(record).items():
            self.writer.add_scalar(name, value, self.epochs)
        self.epochs += 1
        self.writer.flush()

    def task(self, task: int, rows: list[dict[str, Any]]) -> None:
        for name, value in task_scalars(task, rows).items():
            self.writer.add_scalar(name, value, task + 1)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    module = "wandb"

    def __init__(self, run_dir: Path, run_id: str, config: dict[str, Any]) -> None:
        super().__init__(run_dir, run_id, config)
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY")
                                                else "offline")
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nws-bench"),
                              name=run_id, id=run_id, resume="allow", dir=str(run_dir),
                              config=config, mode=mode)

    def epoch(self, record: EpochRecord) -> None:
        self.run.log(epoch_scalars(record) | {"epoch": self.epochs})
        self.epochs += 1

    def task(self, task: int, rows: list[dict[str, Any]]) -> None:
        self.run.log(task_scalars(task, rows) | {"tasks_learned": task + 1})

    def close(self) -> None:
        self.run.finish()


TRACKERS: Registry[type[Tracker]] = Registry("logger")
TRACKERS.register("csv", CSVTracker, "epochs.csv and rows.csv in the run folder (always on)")
TRACKERS.register("tensorboard", TensorBoardTracker,
                  f"TensorBoard event files in <run>/tensorboard/ ({EXTRA})")
TRACKERS.register("wandb", WandbTracker,
                  f"Weights & Biases, offline unless WANDB_API_KEY is set ({EXTRA})")


def check_trackers(names: list[str]) -> list[str]:
    """The names, checked: known (:class:`~benchmarks.core.registry.UnknownNameError` else) and
    their package installed (:class:`MissingTrackerError` naming what to install)."""
    names = list(dict.fromkeys(names))
    for name in names:
        module = getattr(TRACKERS.get(name), "module", None)
        if module is not None and importlib.util.find_spec(module) is None:
            raise MissingTrackerError(f"--logger {name} needs the {module} package: {EXTRA} "
                                      f"(or pip install {module})")
    return names


def open_trackers(names: list[str], run_dir: Path, run_id: str,
                  config: dict[str, Any]) -> list[Tracker]:
    return [TRACKERS.get(n)(run_dir, run_id, config) for n in names]


class TrackerSet:
    """The run's trackers as one: opened at their first call (so a run refused before it
    trains, e.g. a configuration conflict, creates no tracker files), closed on exit."""

    def __init__(self, names: list[str], run_dir: Path, run_id: str,
                 config: dict[str, Any]) -> None:
        self.names, self.args = check_trackers(names), (run_dir, run_id, config)
        self._open: list[Tracker] | None = None

    @property
    def trackers(self) -> list[Tracker]:
        if self._open is None:
            self._open = open_trackers(self.names, *self.args)
        return self._open

    def epoch(self, record: EpochRecord) -> None:
        for tracker in self.trackers:
            tracker.epoch(record)

    def task(self, task: int, rows: list[dict[str, Any]]) -> None:
        for tracker in self.trackers:
            tracker.task(task, rows)

    def __enter__(self) -> TrackerSet:
        return self

    def __exit__(self, *exc: object) -> None:
        for tracker in self._open or []:
            tracker.close()
