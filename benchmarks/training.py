"""The training loop the harness owns: optimiser, schedule, AMP, seeded batches (on the
device for in-memory data), progress, and phase checkpoints to resume a killed phase from
(every few minutes or epochs, and after a phase's last epoch)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from benchmarks.data.batches import DeviceBatches, batches_per_epoch, device_generator
from benchmarks.device_policy import DevicePolicy, compile_mode, compile_options
from benchmarks.loss_monitor import LossMonitor, LossReading
from benchmarks.method import Method
from benchmarks.protocols import Protocol
from benchmarks.seeding import derive_seed, generator, seed_global
from nws.optim import zero_momentum_buffers

log = logging.getLogger("benchmarks")


class TrainingDivergedError(RuntimeError):
    """The loss stopped being finite; nothing of this task is stored."""


MAX_NONFINITE_STEPS = 20
"""Non-finite steps in a row that fp16 loss scaling may skip before a run counts as diverged
(each skip halves the scale: 20 take 65536 below 1e-1). Counted in steps, every step."""


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


def loss_scaling(device: torch.device, amp: str) -> bool:
    """Whether a training step scales its loss (fp16 autocast, which runs on CUDA only)."""
    return device.type == "cuda" and amp == "fp16"


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


def compile_model(model: nn.Module, **options: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` of ``model(x)`` as one frame: the model's forward hooks (KSM's and
    AQD's per-forward banks) are traced with its forward. ``torch.compile(model)`` runs a
    module's hooks outside dynamo and compiles each as a frame of its own (one more graph per
    step, guarded separately). ``options``: ``torch.compile``'s keywords."""

    def call(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    return torch.compile(call, **options)


class Trainer:
    """One optimiser and schedule over one model: ``step`` is the harness's training step.

    The step keeps the host ahead of the device: no host synchronisation inside it (the
    loss comes back as a device tensor; the caller decides when to read it), gradients are
    dropped rather than zeroed, and the optimiser updates all parameters with a few
    multi-tensor ops: ``foreach`` implementations, or ``fused`` when fp16 loss scaling is on
    (only a fused step skips a non-finite step without reading ``found_inf`` on the host;
    its momentum buffers are zeroed up front: :func:`zero_momentum_buffers`).

    ``compile=True``: the model's forward (and so its backward) runs through
    ``torch.compile`` in the mode :func:`benchmarks.device_policy.compile_mode` picks for
    ``device`` (CUDA-graph capture on CUDA). Off by default; the harness passes
    ``DevicePolicy.compile``. ``model`` itself stays the uncompiled module: methods, the
    optimiser and checkpoints see the same parameters and state-dict keys either way.
    """

    def __init__(self, model: nn.Module, method: Method, protocol: Protocol,
                 device: torch.device, compile: bool = False) -> None:
        self.model, self.method, self.protocol, self.device = model, method, protocol, device
        scaling = loss_scaling(device, protocol.amp)
        self.scaler = torch.amp.GradScaler(device.type if scaling else "cuda", enabled=scaling)
        params = list(method.parameters(model))
        impl = {"fused": True} if scaling else {"foreach": True}
        self.opt = make_optimizer(params, protocol, method.optimizer_weight_decay, **impl)
        if scaling:  # a skipped (non-finite) first fused step must leave clean momentum
            zero_momentum_buffers(self.opt)
        self.sched = make_scheduler(self.opt, protocol)
        # non-finite losses, counted on the device each step (read with the loss, no sync):
        # the current run of them and the longest run so far
        self.nonfinite_streak = torch.zeros((), device=device)
        self.nonfinite_peak = torch.zeros((), device=device)
        self.compile_mode = compile_mode(device) if compile else None
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            compile_model(model, **compile_options(device)) if compile else model)

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
        loss = loss.detach()
        self.nonfinite_streak.add_(1).masked_fill_(torch.isfinite(loss), 0)
        torch.maximum(self.nonfinite_peak, self.nonfinite_streak, out=self.nonfinite_peak)
        return loss

    def check_finite(self, reading: LossReading) -> None:
        """fp16 skips up to :data:`MAX_NONFINITE_STEPS` non-finite steps in a row via loss
        scaling; more, or any without loss scaling, is divergence. ``reading.nonfinite``: the
        longest run of non-finite steps up to ``reading.step``, counted every step."""
        limit = MAX_NONFINITE_STEPS if self.scaler.is_enabled() else 0
        if reading.nonfinite <= limit:
            return
        amp = self.protocol.amp if self.device.type == "cuda" else "none"  # CUDA-only AMP
        advice = {"fp16": "use --set amp=bf16 (or amp=none), or lower the learning rate",
                  "bf16": "lower the learning rate, or use --set amp=none"}.get(
            amp, "lower the learning rate (--set lr=...) and check the data for NaN/Inf "
                 "inputs or labels out of range")
        raise TrainingDivergedError(
            f"loss is {reading.loss} at step {reading.step}, {reading.nonfinite} non-finite "
            f"step(s) in a row by then (amp={amp}, lr={self.protocol.lr}); {advice}")


@dataclass
class FitStats:
    seconds: float = 0.0
    steps: int = 0
    final_loss: float = float("nan")


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


def loader(dataset: Dataset, batch_size: int, seed: int, coords: tuple, num_workers: int,
           shuffle: bool = True, drop_last: bool = False, pin_memory: bool = False
           ) -> DataLoader:
    """A loader whose order and augmentation are pure functions of (seed, coords) (the
    per-image path: folder trees such as CUB-to-Sketches, or data on the device turned off).
    ``drop_last=False`` keeps a last partial batch; :func:`fit` still skips one of a single
    image (see :func:`benchmarks.data.batches.batches_per_epoch`). ``pin_memory``:
    :attr:`DevicePolicy.pin_memory` (was: whenever CUDA was visible, also for CPU runs)."""
    aug_seed = derive_seed(seed, *coords, "augment")
    seed_global(seed, *coords, "augment")  # augmentation in the main process

    def init_worker(worker_id: int) -> None:
        torch.manual_seed(aug_seed + worker_id)

    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, generator=generator(seed, *coords, "order"))
        if shuffle else None,
        drop_last=shuffle and drop_last and len(dataset) > batch_size,
        num_workers=num_workers,
        worker_init_fn=init_worker if num_workers else None,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def _on_device(dataset: Dataset, policy: DevicePolicy | None) -> DeviceBatches | None:
    """The dataset as one tensor on the policy's device, where the policy and data allow
    (in-memory data sets, :class:`benchmarks.data.decode_cache.DecodedImages`)."""
    if (policy is None or not policy.data_on_device or not hasattr(dataset, "on_device")
            or getattr(dataset, "batch_augment", None) is None):
        return None
    return dataset.on_device(policy.device, policy.crop_resample)


def _epoch_batches(dataset: Dataset, on_device: DeviceBatches | None, protocol: Protocol,
                   seed: int, coords: tuple, num_workers: int, pin_memory: bool = False
                   ) -> Iterator:
    """One epoch's (x, y) batches from the streams of ``coords`` = (task, phase, epoch)."""
    if on_device is None:
        return iter(loader(dataset, protocol.batch_size, seed, coords, num_workers,
                           drop_last=protocol.drop_last, pin_memory=pin_memory))
    seed_global(seed, *coords, "augment")  # the global streams, as the loader path seeds them
    augment = device_generator(derive_seed(seed, *coords, "augment"), on_device.device)
    return on_device.epoch(protocol.batch_size, generator(seed, *coords, "order"), augment,
                           protocol.drop_last)


# -- RNG state: the CPU generators and the training device's own (only that one) ----------

def _device_rng(device: torch.device) -> Any | None:
    """The torch module holding ``device``'s generator API (``torch.cuda``, ...), if any."""
    if device.type in ("cpu", "meta"):
        return None
    module = getattr(torch, device.type, None)
    return module if hasattr(module, "get_rng_state") else None


def _rng_state(device: torch.device) -> dict[str, Any]:
    """CPU generators (torch, numpy, random) and the generator of ``device`` alone: a run
    resumed with fewer devices visible, or on another index, restores it all the same."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "random": random.getstate(), "device_type": device.type}
    module = _device_rng(device)
    if module is not None:
        state["device"] = module.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    module = _device_rng(device)
    if "device" in state and module is not None:
        if state.get("device_type") != device.type:
            log.warning("checkpoint RNG state is from a %s device, training runs on %s: its "
                        "device generator is not restored", state.get("device_type"),
                        device.type)
        else:
            module.set_rng_state(state["device"], device)


def _save_checkpoint(path: Path, trainer: Trainer, epochs_done: int, stats: FitStats,
                     running: torch.Tensor | None) -> None:
    """Everything the phase's remaining epochs depend on, written atomically (a kill while
    writing leaves the previous checkpoint)."""
    state = {"epochs_done": epochs_done, "model": trainer.model.state_dict(),
             "opt": trainer.opt.state_dict(), "sched": trainer.sched.state_dict(),
             "scaler": trainer.scaler.state_dict(),
             "nonfinite_streak": int(trainer.nonfinite_streak),
             "nonfinite_peak": int(trainer.nonfinite_peak),
             "stats": asdict(stats), "running": None if running is None else running.item(),
             "rng": _rng_state(trainer.device)}
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    tmp, tmp_digest = (path.with_name(path.name + ".tmp"),
                       path.with_name(_digest_path(path).name + ".tmp"))
    tmp.write_bytes(data)
    tmp_digest.write_text(_digest(data))
    os.replace(tmp, path)
    os.replace(tmp_digest, _digest_path(path))


def _digest_path(path: Path) -> Path:
    """The checksum beside a phase checkpoint (``task000-1-nws.pt.blake2b``)."""
    return path.with_name(path.name + ".blake2b")


def _digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents on the CPU, whatever device wrote it (placing them is
    :func:`_restore`'s job: ``map_location=<cuda>`` would put the RNG states on the GPU,
    where ``torch.set_rng_state`` refuses them).

    ``ValueError`` when the file's checksum (written beside it) does not match: torch's zip
    reader does not check CRCs, so damaged tensor bytes would otherwise load as silently
    wrong weights. A checkpoint without a checksum file (older runs, or a kill between the
    two renames) is read unchecked; one whose checksum is stale (the same kill, the other
    order) fails the check and its phase starts over: lost work, never a wrong resume."""
    data = path.read_bytes()
    digest = _digest_path(path)
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
    _set_rng_state(state["rng"], trainer.device)
    running = state["running"]
    return state["epochs_done"], None if running is None else torch.tensor(running)


def _load_checkpoint(path: Path, trainer: Trainer, stats: FitStats
                     ) -> tuple[int, torch.Tensor | None]:
    """Restore a phase from ``path``; returns (epochs done, running loss). A missing or
    unreadable file (a disk that filled up) starts the phase over: it is only a cache."""
    if not path.exists():
        return 0, None
    try:
        state = _read_checkpoint(path)
    except Exception as err:  # any unreadable file: retrain the phase
        log.warning("checkpoint %s is unreadable (%s); this phase starts over", path, err)
        return 0, None
    return _restore(state, trainer, stats, path)


def fit(model: nn.Module, method: Method, protocol: Protocol, dataset: Dataset, *,
        device: torch.device, seed: int, task: int, phase: str, num_workers: int = 0,
        progress: bool = True, desc: str = "", stats: FitStats | None = None,
        checkpoint: Path | None = None, checkpoint_every: CheckpointPolicy | None = None,
        policy: DevicePolicy | None = None) -> FitStats:
    """Train ``model`` on ``dataset`` for ``protocol.epochs`` epochs (one phase of a task).

    ``checkpoint``: the model, optimiser, schedule, loss scaler, statistics and RNG state are
    saved there as ``checkpoint_every`` says (default :data:`DEFAULT_CHECKPOINT_EVERY`) and
    after the phase's last epoch, and a phase that finds one continues after its last saved
    epoch (one that finds its phase finished only restores it). Each epoch's data order and
    augmentation are seeded by (seed, task, phase, epoch), so on CPU with ``--deterministic``
    the result is bit-identical to an uninterrupted run; the epochs after the last save are
    lost. ``stats.seconds`` counts the epochs kept.

    ``policy`` (default: :meth:`DevicePolicy.for_device`): with ``data_on_device`` an
    in-memory data set is one uint8 tensor on ``device``, batches are drawn and augmented
    there (:mod:`benchmarks.data.batches`); other data sets go through a DataLoader.
    ``protocol.drop_last`` decides the last partial batch (a batch of one image is always
    dropped: BatchNorm cannot train on it); kept, it is the one batch of another size.
    """
    stats = stats if stats is not None else FitStats()
    policy = policy if policy is not None else DevicePolicy.for_device(device)
    every = checkpoint_every or CheckpointPolicy.parse(DEFAULT_CHECKPOINT_EVERY)
    model.to(device).train()
    trainer = Trainer(model, method, protocol, device, compile=policy.compile)
    per_epoch = batches_per_epoch(len(dataset), protocol.batch_size, protocol.drop_last)
    if protocol.max_steps_per_epoch is not None:
        per_epoch = min(per_epoch, protocol.max_steps_per_epoch)
    first, running = _load_checkpoint(checkpoint, trainer, stats) if checkpoint else (0, None)
    if first:
        log.info("%s: resumed after epoch %d/%d (step %d) from %s", desc or phase, first,
                 protocol.epochs, stats.steps, checkpoint)
    on_device = _on_device(dataset, policy)
    bar = tqdm(total=protocol.epochs * per_epoch, initial=first * per_epoch, desc=desc,
               disable=not progress, leave=False, unit="step", dynamic_ncols=True,
               mininterval=0.5)
    start = saved_at = time.perf_counter()
    saved_epoch = first
    monitor = LossMonitor(device)  # loss read back without waiting for the device

    def report(reading: LossReading | None, epoch: int) -> LossReading | None:
        if reading is not None:
            trainer.check_finite(reading)
            bar.set_postfix(epoch=f"{epoch + 1}/{protocol.epochs}",
                            loss=f"{reading.running:.3f}",
                            lr=f"{trainer.opt.param_groups[0]['lr']:.1e}", refresh=False)
        return reading

    for epoch in range(first, protocol.epochs):
        batches = _epoch_batches(dataset, on_device, protocol, seed, (task, phase, epoch),
                                 num_workers, policy.pin_memory)
        for i, (x, y) in enumerate(batches):
            if i >= per_epoch:
                break
            loss = trainer.step(x, y)
            running = loss if running is None else 0.9 * running + 0.1 * loss
            stats.steps += 1
            report(monitor.offer(stats.steps, loss, running, report=i == per_epoch - 1,
                                 nonfinite=trainer.nonfinite_peak), epoch)
            bar.update(1)
        last_step = report(monitor.settle(), epoch)  # the one wait of an epoch: its last step
        trainer.sched.step()
        if not progress:  # no bar (e.g. output to a log): one line per epoch instead
            log.info("task %d [%s] epoch %d/%d: loss %.4f", task + 1, phase, epoch + 1,
                     protocol.epochs, float("nan") if last_step is None else last_step.running)
        now = time.perf_counter()
        last = epoch + 1 == protocol.epochs
        if checkpoint is not None and (last or every.due(epoch + 1 - saved_epoch,
                                                         now - saved_at)):
            stats.seconds, start = stats.seconds + now - start, now
            stats.final_loss = float(running) if running is not None else float("nan")
            _save_checkpoint(checkpoint, trainer, epoch + 1, stats, running)
            saved_at, saved_epoch = time.perf_counter(), epoch + 1
    bar.close()
    stats.seconds += time.perf_counter() - start
    stats.final_loss = float(running) if running is not None else float("nan")
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, device: torch.device, batch_size: int,
             amp: str = "none", num_workers: int = 0, policy: DevicePolicy | None = None
             ) -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``dataset`` (on the device as ``policy``
    says, like :func:`fit`; the count is read back once, at the end)."""
    model.to(device).eval()
    policy = policy if policy is not None else DevicePolicy.for_device(device)
    on_device = _on_device(dataset, policy)
    batches = (on_device.ordered(batch_size) if on_device is not None else
               DataLoader(dataset, batch_size=batch_size, shuffle=False,
                          num_workers=num_workers))
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    for x, y in batches:
        y = y.to(device)
        with autocast_for(device, amp):
            pred = model(x.to(device)).argmax(1)
        correct += (pred == y).sum()
        total += len(y)
    if total == 0:
        raise ValueError("empty test set")
    return int(correct) / total


FitFn = Callable[[nn.Module, Protocol, str], None]
