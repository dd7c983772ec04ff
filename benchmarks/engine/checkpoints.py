"""Phase checkpoints, all in one place: when one is written (:class:`CheckpointPolicy`), what
it holds (model, optimiser, schedule, loss scaler, statistics, RNG states) and how it is
written (atomically, with a blake2b checksum beside it) and read back onto the training
device; and where a run keeps them (:func:`checkpoint_folder`, one file per task phase).

A checkpoint is only a cache: a missing or unreadable one restarts its phase."""

from __future__ import annotations

import io
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from benchmarks.core.store import checksum as _digest
from nws.atomic import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:  # the training loop imports this module
    from benchmarks.engine.training import FitStats, Trainer

log = logging.getLogger("benchmarks")


DEFAULT_CHECKPOINT_EVERY = "10m"
"""Ours: a phase checkpoint at most every 10 minutes (and always after a phase's last epoch).
A preempted job loses at most ~10 minutes of one phase, and a GPU run, whose CIFAR task epochs
take seconds, no longer writes a 85 MiB checkpoint after each of them (~170 GB per run)."""


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a phase checkpoint is written: every ``epochs`` epochs, or after the first epoch
    that ends ``seconds`` or more after the last write (or the phase's start); after the
    phase's last epoch always. Which epochs are saved never changes results: each epoch's
    data order and augmentation are seeded by its coordinates."""

    epochs: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str | int) -> CheckpointPolicy:
        """``"5"`` (epochs), ``"10m"`` (minutes), ``"90s"``, ``"2h"``; ``ValueError`` else."""
        raw = str(text).strip().lower()
        unit = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(raw[-1:]) if raw else None
        number = raw[:-1] if unit else raw
        try:
            value = float(number) if unit else int(number)
        except ValueError:
            value = -1
        if not value > 0:
            raise ValueError(f"--checkpoint-every {text!r}: give a number of epochs (e.g. 5) "
                             f"or a time interval (e.g. 10m, 90s, 2h)")
        return cls(seconds=value * unit) if unit else cls(epochs=int(value))

    def due(self, epochs_since: int, seconds_since: float) -> bool:
        if self.epochs is not None:
            return epochs_since >= self.epochs
        return seconds_since >= (self.seconds or 0.0)


# -- RNG state: the CPU generators and the training device's own (only that one) ----------

def device_rng(device: torch.device) -> Any | None:
    """The torch module holding ``device``'s generator API (``torch.cuda``, ...), if any."""
    if device.type in ("cpu", "meta"):
        return None
    module = getattr(torch, device.type, None)
    return module if hasattr(module, "get_rng_state") else None


def rng_state(device: torch.device) -> dict[str, Any]:
    """CPU generators (torch, numpy, random) and the generator of ``device`` alone: a run
    resumed with fewer devices visible, or on another index, restores it all the same."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "random": random.getstate(), "device_type": device.type}
    module = device_rng(device)
    if module is not None:
        state["device"] = module.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    module = device_rng(device)
    if "device" in state and module is not None:
        if state.get("device_type") != device.type:
            log.warning("checkpoint RNG state is from a %s device, training runs on %s: its "
                        "device generator is not restored", state.get("device_type"),
                        device.type)
        else:
            module.set_rng_state(state["device"], device)


def save_checkpoint(path: Path, trainer: Trainer, epochs_done: int, stats: FitStats,
                     running: torch.Tensor | None) -> None:
    """Everything the phase's remaining epochs depend on, written atomically (a kill while
    writing leaves the previous checkpoint)."""
    state = {"epochs_done": epochs_done, "model": trainer.model.state_dict(),
             "opt": trainer.opt.state_dict(), "sched": trainer.sched.state_dict(),
             "scaler": trainer.scaler.state_dict(),
             "nonfinite_streak": int(trainer.nonfinite_streak),
             "nonfinite_peak": int(trainer.nonfinite_peak),
             "stats": asdict(stats), "running": None if running is None else running.item(),
             "rng": rng_state(trainer.device)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    atomic_write_bytes(path, data)
    atomic_write_text(digest_path(path), _digest(data))


def digest_path(path: Path) -> Path:
    """The checksum beside a phase checkpoint (``task000-1-nws.pt.blake2b``)."""
    return path.with_name(path.name + ".blake2b")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents on the CPU, whatever device wrote it (placing them is
    :func:`_restore`'s job: ``map_location=<cuda>`` would put the RNG states on the GPU,
    where ``torch.set_rng_state`` refuses them).

    ``ValueError`` when the file's checksum (written beside it) does not match: torch's zip
    reader does not check CRCs, so damaged tensor bytes would otherwise load as silently
    wrong weights. A checkpoint without a checksum file (older runs, or a kill between the
    two renames) is read unchecked; one whose checksum is stale (the same kill, the other
    order) fails the check and its phase starts over: lost work, never a wrong resume."""
    data = path.read_bytes()
    digest = digest_path(path)
    if digest.exists() and digest.read_text().strip() != _digest(data):
        raise ValueError(f"checksum mismatch against {digest.name} (a damaged file)")
    # our own file, holding numpy's RNG state: not loadable with weights_only
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _restore(state: dict[str, Any], trainer: Trainer, stats: FitStats, path: Path
             ) -> tuple[int, torch.Tensor | None]:
    """Place a checkpoint read on the CPU: model tensors are copied into the model's own
    (device) tensors, the optimiser state follows its parameters' device (torch's
    ``Optimizer.load_state_dict``), RNG states stay on the CPU."""
    try:
        trainer.model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise RuntimeError(
            f"checkpoint {path} does not fit this model (was the code changed since it was "
            f"written?); delete it to retrain this phase from its start") from err
    trainer.opt.load_state_dict(state["opt"])
    trainer.sched.load_state_dict(state["sched"])
    if state["scaler"] or not trainer.scaler.is_enabled():
        trainer.scaler.load_state_dict(state["scaler"])
    else:  # written where the scaler was off (CPU, amp != fp16): an enabled one starts fresh
        log.warning("checkpoint %s holds no loss-scaler state; fp16 loss scaling starts afresh",
                    path)
    trainer.nonfinite_streak.fill_(state["nonfinite_streak"])
    trainer.nonfinite_peak.fill_(state.get("nonfinite_peak", state["nonfinite_streak"]))
    for name, value in state["stats"].items():
        setattr(stats, name, value)
    set_rng_state(state["rng"], trainer.device)
    running = state["running"]
    return state["epochs_done"], None if running is None else torch.tensor(running)


def load_checkpoint(path: Path, trainer: Trainer, stats: FitStats
                     ) -> tuple[int, torch.Tensor | None]:
    """Restore a phase from ``path``; returns (epochs done, running loss). A missing or
    unreadable file (a disk that filled up) starts the phase over: it is only a cache."""
    if not path.exists():
        return 0, None
    try:
        state = read_checkpoint(path)
    except Exception as err:  # any unreadable file: retrain the phase
        log.warning("checkpoint %s is unreadable (%s); this phase starts over", path, err)
        return 0, None
    return _restore(state, trainer, stats, path)


def checkpoint_folder(checkpoint_dir: str | None, rid: str, run_dir: Path) -> Path:
    """Where run ``rid`` keeps its phase checkpoints: ``<checkpoint_dir>/<rid>/``, or the run
    folder's ``checkpoints/``."""
    if checkpoint_dir:
        return Path(checkpoint_dir).expanduser().resolve() / rid
    return run_dir / "checkpoints"


def adopt_checkpoints(before: Path, now: Path) -> None:
    """Move the phase checkpoints a run left in ``before`` (an earlier launch's
    ``--checkpoint-dir``) to ``now``, so a relaunch with another (or no) ``--checkpoint-dir``
    resumes from them instead of silently training the task again. A folder that is not
    reachable here (another node's scratch) has nothing to move."""
    if before == now or not before.is_dir():
        return
    found = sorted(before.glob("task*.pt"))  # names of checkpoint_prefix
    if not found:
        return
    now.mkdir(parents=True, exist_ok=True)
    for path in found:
        shutil.move(str(path), now / path.name)
    log.info("moved %d phase checkpoint(s) of this run from %s (an earlier --checkpoint-dir) "
             "to %s", len(found), before, now)


def checkpoint_prefix(task: int) -> str:
    """File name prefix of a task's phase checkpoints (``task003-1-retrain.pt``)."""
    return f"task{task:03d}-"
