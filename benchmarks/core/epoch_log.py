"""Per-epoch records of a run: ``epochs.csv`` in the run folder, written as the run goes.

One row per (task, phase, epoch), columns :data:`COLUMNS` then the method's own figures
(:attr:`benchmarks.methods.contract.Method.EPOCH_FIGURES`, e.g. NWS's ``kernels_changed``):

- ``loss``: mean training loss of the epoch's finite steps (every step, not a sample);
- ``nonfinite_steps``: steps whose loss was NaN or infinite;
- ``lr``: the learning rate the epoch trained with (before the schedule's step);
- ``seconds``: wall time of the epoch (its last step waited for); ``images_per_s``.

Cost (the training step is untouched): each step copies its loss into a per-epoch buffer on
the device (one copy kernel, no host read); at the epoch's end, after the one wait the loop
already does (:meth:`benchmarks.engine.loss_monitor.LossMonitor.settle`), a few ops reduce the
buffer and the method's figures and one read brings them to the host. The row is appended
and the file closed (flushed) at once: a killed run keeps every epoch it finished. A resumed
phase first drops the rows at or after the (task, phase, epoch) it resumes from, so epochs
trained again after the last checkpoint are not recorded twice (a phase found finished
keeps the rows after it).
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from benchmarks.core.store import atomic_write_text

FILE = "epochs.csv"
KEY = ["task", "phase_index", "epoch"]
COLUMNS = ["task", "phase_index", "phase", "epoch", "epochs", "steps", "loss", "lr", "seconds",
           "images_per_s", "nonfinite_steps"]


@dataclass
class EpochRecord:
    """One epoch of one training phase (``phase_index``: the phase's place in its task)."""

    task: int
    phase_index: int
    phase: str
    epoch: int
    epochs: int
    steps: int
    loss: float
    lr: float
    seconds: float
    images_per_s: float
    nonfinite_steps: int
    figures: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        return out | out.pop("figures")


class EpochCSV:
    """``epochs.csv`` of one run folder: the header is :data:`COLUMNS` + ``figures``."""

    def __init__(self, run_dir: Path, figures: Sequence[str] = ()) -> None:
        self.path = Path(run_dir) / FILE
        self.columns = [*COLUMNS, *figures]

    def read(self) -> pd.DataFrame:
        return read_epochs(self.path)

    def resume_from(self, task: int, phase_index: int, epoch: int) -> None:
        """Drop the rows at or after (task, phase_index, epoch): they are trained again."""
        df = self.read()
        if df.empty:
            return
        keep = [tuple(k) < (task, phase_index, epoch) for k in df[KEY].itertuples(index=False)]
        if all(keep):
            return
        buf = io.StringIO()
        df[keep].reindex(columns=self.columns).to_csv(buf, index=False)
        atomic_write_text(self.path, buf.getvalue())

    def append(self, record: EpochRecord) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as fh:  # closed: flushed to the OS at once
            writer = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(record.row())


def read_epochs(path: str | Path) -> pd.DataFrame:
    """An ``epochs.csv`` (a file or a run folder) as a frame; empty when absent or damaged."""
    path = Path(path)
    path = path / FILE if path.is_dir() else path
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return pd.DataFrame(columns=COLUMNS)


class EpochLosses:
    """Each step's loss in a buffer on the training device; reduced once per epoch."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.buffer = torch.empty(max(steps, 1), dtype=torch.float32, device=device)

    @torch.no_grad()
    def put(self, i: int, loss: torch.Tensor) -> None:
        self.buffer[i].copy_(loss)  # a view and one copy kernel; no host read

    def summary(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss of the finite steps, count of non-finite steps) of the first ``n``,
        as device tensors (read by the caller)."""
        v = self.buffer[:n]
        finite = torch.isfinite(v)
        count = finite.sum()
        mean = torch.where(finite, v, 0.0).sum() / count.clamp(min=1)
        return mean, n - count


Sink = Callable[[EpochRecord], None]


class PhaseRecorder:
    """What :func:`benchmarks.engine.training.fit` calls around one phase's epochs: ``start`` once
    (the first epoch it trains: earlier ones are restored from a checkpoint), ``begin`` and
    ``end`` around each epoch, ``step`` after each step. ``end`` builds the
    :class:`EpochRecord` and hands it to ``sink`` (the run's :class:`EpochLog`)."""

    def __init__(self, sink: EpochLog, task: int, phase_index: int, phase: str,
                 method: Any, model: nn.Module) -> None:
        self.sink, self.task, self.phase_index, self.phase = sink, task, phase_index, phase
        self.method, self.model = method, model
        self.losses: EpochLosses | None = None
        self.epochs = 0

    def start(self, first: int, epochs: int, steps_per_epoch: int,
              device: torch.device) -> None:
        self.epochs = epochs
        if first < epochs:  # a finished phase (first == epochs) keeps the later phases' rows
            self.sink.resumed(self.task, self.phase_index, first)
        self.losses = EpochLosses(steps_per_epoch, device)

    def begin(self, epoch: int) -> None:
        self.images, self.steps, self.state = 0, 0, None
        self.started = time.perf_counter()

    def step(self, i: int, loss: torch.Tensor, batch: torch.Tensor) -> None:
        if i == 0:  # after the epoch's first forward: what it used (device ops, no read)
            self.state = self.method.epoch_state(self.model)
        self.losses.put(i, loss)
        self.images += batch.shape[0]  # the shape is on the host: no read
        self.steps += 1

    def end(self, epoch: int, lr: float) -> None:
        """After the epoch's last step was waited for; one device read here."""
        figures = self.method.epoch_figures(self.model, self.state)
        names = list(figures)
        mean, bad = self.losses.summary(self.steps)
        values = torch.stack([mean.float(), bad.float(),
                              *(figures[k].detach().float().to(mean.device) for k in names)])
        loss, nonfinite, *extra = values.tolist()
        seconds = time.perf_counter() - self.started
        self.sink(EpochRecord(
            self.task, self.phase_index, self.phase, epoch, self.epochs, self.steps,
            loss if self.steps - nonfinite > 0 else math.nan, float(lr), round(seconds, 4),
            round(self.images / seconds, 2) if seconds > 0 else math.nan, int(nonfinite),
            dict(zip(names, extra, strict=True))))


class EpochLog:
    """The run's per-epoch sink: ``epochs.csv`` plus the run's trackers
    (:mod:`benchmarks.engine.trackers`)."""

    def __init__(self, run_dir: Path, figures: Sequence[str] = (),
                 trackers: Sequence[Any] = ()) -> None:
        self.csv = EpochCSV(run_dir, figures)
        self.trackers = list(trackers)

    def resumed(self, task: int, phase_index: int, epoch: int) -> None:
        self.csv.resume_from(task, phase_index, epoch)

    def __call__(self, record: EpochRecord) -> None:
        self.csv.append(record)
        for tracker in self.trackers:
            tracker.epoch(record)

    def phase(self, task: int, phase_index: int, phase: str, method: Any,
              model: nn.Module) -> PhaseRecorder:
        return PhaseRecorder(self, task, phase_index, phase, method, model)
