"""The training loop the harness owns: optimiser, schedule, AMP, seeded loaders, progress,
and a checkpoint after every epoch to resume a killed phase from."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from benchmarks.device_policy import compile_mode, compile_options
from benchmarks.method import Method
from benchmarks.protocols import Protocol
from benchmarks.seeding import derive_seed, generator, seed_global

log = logging.getLogger("benchmarks")


class TrainingDivergedError(RuntimeError):
    """The loss stopped being finite; nothing of this task is stored."""


def make_optimizer(params: list, protocol: Protocol, weight_decay: bool,
                   **impl: bool) -> torch.optim.Optimizer:
    """``impl``: torch's implementation switches (``foreach``, ``fused``), passed through."""
    wd = protocol.weight_decay if weight_decay else 0.0
    if protocol.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=protocol.lr, momentum=protocol.momentum, nesterov=protocol.nesterov,
            weight_decay=wd, **impl,
        )
    if protocol.optimizer == "adam":
        return torch.optim.Adam(params, lr=protocol.lr, betas=(protocol.momentum, 0.999),
                                weight_decay=wd, **impl)
    raise ValueError(f"unknown optimizer {protocol.optimizer!r}; valid: sgd, adam")


def make_scheduler(opt: torch.optim.Optimizer, protocol: Protocol):
    if protocol.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=list(protocol.lr_milestones), gamma=protocol.lr_gamma
        )
    if protocol.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(protocol.epochs, 1))
    raise ValueError(f"unknown schedule {protocol.schedule!r}; valid: multistep, cosine")


def autocast_for(device: torch.device, amp: str):
    """bf16/fp16 autocast on CUDA; a no-op context elsewhere or with amp='none'."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


class Trainer:
    """One optimiser and schedule over one model: ``step`` is the harness's training step.

    The step keeps the host ahead of the device: no host synchronisation inside it (the
    loss comes back as a device tensor; the caller decides when to read it), gradients are
    dropped rather than zeroed, and the optimiser updates all parameters with a few
    multi-tensor ops: ``foreach`` implementations, or ``fused`` when fp16 loss scaling is on
    (only a fused step skips a non-finite step without reading ``found_inf`` on the host).

    ``compile=True``: the model's forward (and so its backward) runs through
    ``torch.compile`` in the mode :func:`benchmarks.device_policy.compile_mode` picks for
    ``device`` (CUDA-graph capture on CUDA). Off by default; the harness passes
    ``DevicePolicy.compile``. ``model`` itself stays the uncompiled module: methods, the
    optimiser and checkpoints see the same parameters and state-dict keys either way.
    """

    def __init__(self, model: nn.Module, method: Method, protocol: Protocol,
                 device: torch.device, compile: bool = False) -> None:
        self.model, self.method, self.protocol, self.device = model, method, protocol, device
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda"
                                           and protocol.amp == "fp16")
        params = list(method.parameters(model))
        impl = {"fused": True} if self.scaler.is_enabled() else {"foreach": True}
        self.opt = make_optimizer(params, protocol, method.optimizer_weight_decay, **impl)
        self.sched = make_scheduler(self.opt, protocol)
        self.nonfinite_streak = 0
        self.compile_mode = compile_mode(device) if compile else None
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(model, **compile_options(device)) if compile else model)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimiser step on the batch ``(x, y)``; returns the loss (a device tensor)."""
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration of captured graphs
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        with autocast_for(self.device, self.protocol.amp):
            loss = F.cross_entropy(self.forward(x), y)
            extra = self.method.extra_loss(self.model)
            if extra is not None:
                loss = loss + extra
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
        self.method.after_backward(self.model)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.method.after_step(self.model)
        return loss.detach()

    def check_finite(self, loss: float, step: int) -> None:
        """fp16 skips a few non-finite steps via loss scaling; anything else is divergence."""
        if math.isfinite(loss):
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        if not self.scaler.is_enabled() or self.nonfinite_streak > 20:
            raise TrainingDivergedError(
                f"loss is {loss} at step {step} (amp={self.protocol.amp}, lr={self.protocol.lr});"
                " lower the learning rate or use --set amp=bf16 / amp=none"
            )


@dataclass
class FitStats:
    seconds: float = 0.0
    steps: int = 0
    final_loss: float = float("nan")


def loader(dataset: Dataset, batch_size: int, seed: int, coords: tuple, num_workers: int,
           shuffle: bool = True) -> DataLoader:
    """A loader whose order and augmentation are pure functions of (seed, coords)."""
    aug_seed = derive_seed(seed, *coords, "augment")
    seed_global(seed, *coords, "augment")  # augmentation in the main process

    def init_worker(worker_id: int) -> None:
        torch.manual_seed(aug_seed + worker_id)

    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, generator=generator(seed, *coords, "order"))
        if shuffle else None,
        drop_last=shuffle and len(dataset) > batch_size,  # a batch of 1 breaks BatchNorm
        num_workers=num_workers,
        worker_init_fn=init_worker if num_workers else None,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "random": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, trainer: Trainer, epochs_done: int, stats: FitStats,
                     running: torch.Tensor | None) -> None:
    """Everything the phase's remaining epochs depend on, written atomically (a kill while
    writing leaves the previous checkpoint)."""
    state = {"epochs_done": epochs_done, "model": trainer.model.state_dict(),
             "opt": trainer.opt.state_dict(), "sched": trainer.sched.state_dict(),
             "scaler": trainer.scaler.state_dict(), "nonfinite_streak": trainer.nonfinite_streak,
             "stats": asdict(stats), "running": None if running is None else running.item(),
             "rng": _rng_state()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, trainer: Trainer, stats: FitStats
                     ) -> tuple[int, torch.Tensor | None]:
    """Restore a phase from ``path``; returns (epochs done, running loss). A missing or
    unreadable file (a disk that filled up) starts the phase over: it is only a cache."""
    if not path.exists():
        return 0, None
    try:  # our own file, holding numpy's RNG state: not loadable with weights_only
        state = torch.load(path, map_location=trainer.device, weights_only=False)
    except Exception as err:  # any unreadable file: retrain the phase
        log.warning("checkpoint %s is unreadable (%s); this phase starts over", path, err)
        return 0, None
    try:
        trainer.model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise RuntimeError(
            f"checkpoint {path} does not fit this model (was the code changed since it was "
            f"written?); delete it to retrain this phase from its start") from err
    trainer.opt.load_state_dict(state["opt"])
    trainer.sched.load_state_dict(state["sched"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.nonfinite_streak = state["nonfinite_streak"]
    for name, value in state["stats"].items():
        setattr(stats, name, value)
    _set_rng_state(state["rng"])
    running = state["running"]
    return state["epochs_done"], None if running is None else torch.tensor(running)


def fit(model: nn.Module, method: Method, protocol: Protocol, dataset: Dataset, *,
        device: torch.device, seed: int, task: int, phase: str, num_workers: int = 0,
        progress: bool = True, desc: str = "", stats: FitStats | None = None,
        checkpoint: Path | None = None) -> FitStats:
    """Train ``model`` on ``dataset`` for ``protocol.epochs`` epochs (one phase of a task).

    ``checkpoint``: after every epoch the model, optimiser, schedule, loss scaler, statistics
    and RNG state are saved there, and a phase that finds one continues after its last
    finished epoch (one that finds its phase finished only restores it). Each epoch's data
    order and augmentation are seeded by (seed, task, phase, epoch), so on CPU with
    ``--deterministic`` the result is bit-identical to an uninterrupted run; the epoch that
    was running when the run was killed is lost. ``stats.seconds`` counts the epochs kept.
    """
    stats = stats if stats is not None else FitStats()
    model.to(device).train()
    trainer = Trainer(model, method, protocol, device)
    per_epoch = len(dataset) // protocol.batch_size if len(dataset) > protocol.batch_size else 1
    if protocol.max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, protocol.max_steps_per_epoch)
    first, running = _load_checkpoint(checkpoint, trainer, stats) if checkpoint else (0, None)
    if first:
        log.info("%s: resumed after epoch %d/%d from %s", desc or phase, first,
                 protocol.epochs, checkpoint)
    bar = tqdm(total=protocol.epochs * per_epoch, initial=first * per_epoch, desc=desc,
               disable=not progress, leave=False, unit="step", dynamic_ncols=True,
               mininterval=0.5)
    start = time.perf_counter()
    for epoch in range(first, protocol.epochs):
        dl = loader(dataset, protocol.batch_size, seed, (task, phase, epoch), num_workers)
        for i, (x, y) in enumerate(dl):
            if i >= per_epoch:
                break
            loss = trainer.step(x, y)
            running = loss if running is None else 0.9 * running + 0.1 * loss
            stats.steps += 1
            if i % 10 == 0 or i == per_epoch - 1:
                value = float(loss)
                trainer.check_finite(value, stats.steps)
                bar.set_postfix(epoch=f"{epoch + 1}/{protocol.epochs}",
                                loss=f"{float(running):.3f}",
                                lr=f"{trainer.opt.param_groups[0]['lr']:.1e}", refresh=False)
            bar.update(1)
        trainer.sched.step()
        if checkpoint is not None:
            now = time.perf_counter()
            stats.seconds, start = stats.seconds + now - start, now
            stats.final_loss = float(running) if running is not None else float("nan")
            _save_checkpoint(checkpoint, trainer, epoch + 1, stats, running)
    bar.close()
    stats.seconds += time.perf_counter() - start
    stats.final_loss = float(running) if running is not None else float("nan")
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, device: torch.device, batch_size: int,
             amp: str = "none", num_workers: int = 0) -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``dataset``."""
    model.to(device).eval()
    dl = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    correct = total = 0
    for x, y in dl:
        with autocast_for(device, amp):
            pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    if total == 0:
        raise ValueError("empty test set")
    return correct / total


FitFn = Callable[[nn.Module, Protocol, str], None]
