"""The training loop the harness owns: optimiser, schedule, AMP, seeded batches (on the
device for in-memory data), progress, and phase checkpoints to resume a killed phase from
(every few minutes or epochs, and after a phase's last epoch)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from benchmarks.core.device_policy import DevicePolicy, compile_mode, compile_options
from benchmarks.core.epoch_log import PhaseRecorder
from benchmarks.core.protocols import Protocol
from benchmarks.core.seeding import derive_seed, generator, seed_global
from benchmarks.data.batches import DeviceBatches, batches_per_epoch, device_generator
from benchmarks.engine.checkpoints import (
    DEFAULT_CHECKPOINT_EVERY,
    CheckpointPolicy,
    load_checkpoint,
    save_checkpoint,
)
from benchmarks.engine.loss_monitor import LossMonitor, LossReading
from benchmarks.methods.contract import Method
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


def make_scheduler(opt: torch.optim.Optimizer, protocol: Protocol, steps_per_epoch: int = 1):
    """The protocol's schedule. ``lr_schedule_unit`` "epoch": stepped once per epoch;
    "step": stepped after every optimiser step, milestones and the cosine period scaled by
    ``steps_per_epoch`` (so both span the same epochs)."""
    per = steps_per_epoch if protocol.lr_schedule_unit == "step" else 1
    if protocol.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[m * per for m in protocol.lr_milestones], gamma=protocol.lr_gamma
        )
    if protocol.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(protocol.epochs * per, 1))
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
    ``torch.compile`` in the mode :func:`benchmarks.core.device_policy.compile_mode` picks for
    ``device`` (CUDA-graph capture on CUDA). Off by default; the harness passes
    ``DevicePolicy.compile``. ``model`` itself stays the uncompiled module: methods, the
    optimiser and checkpoints see the same parameters and state-dict keys either way.
    """

    def __init__(self, model: nn.Module, method: Method, protocol: Protocol,
                 device: torch.device, compile: bool = False, steps_per_epoch: int = 1) -> None:
        self.model, self.method, self.protocol, self.device = model, method, protocol, device
        scaling = loss_scaling(device, protocol.amp)
        self.scaler = torch.amp.GradScaler(device.type if scaling else "cuda", enabled=scaling)
        params = list(method.parameters(model))
        impl = {"fused": True} if scaling else {"foreach": True}
        self.opt = make_optimizer(params, protocol, method.optimizer_weight_decay, **impl)
        if scaling:  # a skipped (non-finite) first fused step must leave clean momentum
            zero_momentum_buffers(self.opt)
        self.sched = make_scheduler(self.opt, protocol, steps_per_epoch)
        self.sched_per_step = protocol.lr_schedule_unit == "step"
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


@dataclass
class PhaseSpec:
    """One training phase of one task: which it is (``seed``, ``task``, ``phase`` seed its
    data order and augmentation), where it runs (``device``; ``policy``, default
    :meth:`DevicePolicy.for_device`; data-loader ``num_workers``), and what it keeps and
    shows (``checkpoint`` file and ``checkpoint_every``, default
    :data:`DEFAULT_CHECKPOINT_EVERY`; per-epoch ``recorder``; a progress bar titled
    ``desc``)."""

    device: torch.device
    seed: int
    task: int
    phase: str = "train"
    num_workers: int = 0
    progress: bool = True
    desc: str = ""
    checkpoint: Path | None = None
    checkpoint_every: CheckpointPolicy | None = None
    policy: DevicePolicy | None = None
    recorder: PhaseRecorder | None = None


def fit(model: nn.Module, method: Method, protocol: Protocol, dataset: Dataset,
        spec: PhaseSpec, stats: FitStats | None = None) -> FitStats:
    """Train ``model`` on ``dataset`` for ``protocol.epochs`` epochs (one phase of a task);
    returns ``stats`` (new if None) with the phase's steps, seconds and last loss added.

    Checkpoint (``spec.checkpoint``): the model, optimiser, schedule, loss scaler, statistics
    and RNG state are saved as ``spec.checkpoint_every`` says and after the phase's last
    epoch, and a phase that finds one continues after its last saved epoch (one that finds
    its phase finished only restores it). Each epoch's data order and augmentation are
    seeded by (seed, task, phase, epoch), so on CPU with ``--deterministic`` the result is
    bit-identical to an uninterrupted run; the epochs after the last save are lost.
    ``stats.seconds`` counts the epochs kept.

    Data: with the policy's ``data_on_device`` an in-memory data set is one uint8 tensor on
    the device, batches are drawn and augmented there (:mod:`benchmarks.data.batches`);
    other data sets go through a DataLoader. ``protocol.drop_last`` decides the last partial
    batch (a batch of one image is always dropped: BatchNorm cannot train on it); kept, it
    is the one batch of another size.

    ``spec.recorder``: per-epoch records (:mod:`benchmarks.core.epoch_log`): called around
    each epoch and given each step's loss on the device; it reads once per epoch, after the
    epoch's wait."""
    return _PhaseLoop(model, method, protocol, dataset, spec,
                      stats if stats is not None else FitStats()).run()


class _PhaseLoop:
    """The state of one :func:`fit` call: its trainer, data, bar and checkpoint clock."""

    def __init__(self, model: nn.Module, method: Method, protocol: Protocol,
                 dataset: Dataset, spec: PhaseSpec, stats: FitStats) -> None:
        self.spec, self.protocol, self.dataset, self.stats = spec, protocol, dataset, stats
        self.policy = spec.policy or DevicePolicy.for_device(spec.device)
        self.every = spec.checkpoint_every or CheckpointPolicy.parse(DEFAULT_CHECKPOINT_EVERY)
        model.to(spec.device).train()
        per_epoch = batches_per_epoch(len(dataset), protocol.batch_size, protocol.drop_last)
        if protocol.max_steps_per_epoch is not None:
            per_epoch = min(per_epoch, protocol.max_steps_per_epoch)
        self.per_epoch = per_epoch
        self.trainer = Trainer(model, method, protocol, spec.device,
                               compile=self.policy.compile, steps_per_epoch=per_epoch)
        self.first, self.running = (load_checkpoint(spec.checkpoint, self.trainer, stats)
                                    if spec.checkpoint else (0, None))
        if self.first:
            log.info("%s: resumed after epoch %d/%d (step %d) from %s",
                     spec.desc or spec.phase, self.first, protocol.epochs, stats.steps,
                     spec.checkpoint)
        self.on_device = _on_device(dataset, self.policy)
        self.monitor = LossMonitor(spec.device)  # loss read back without waiting
        self.bar = tqdm(total=protocol.epochs * per_epoch, initial=self.first * per_epoch,
                        desc=spec.desc, disable=not spec.progress, leave=False, unit="step",
                        dynamic_ncols=True, mininterval=0.5)

    def run(self) -> FitStats:
        spec, stats = self.spec, self.stats
        self.start = self.saved_at = time.perf_counter()
        self.saved_epoch = self.first
        if spec.recorder is not None:
            spec.recorder.start(self.first, self.protocol.epochs, self.per_epoch, spec.device)
        for epoch in range(self.first, self.protocol.epochs):
            self._after_epoch(epoch, self._epoch(epoch))
        self.bar.close()
        stats.seconds += time.perf_counter() - self.start
        stats.final_loss = self._final_loss()
        return stats

    def _epoch(self, epoch: int) -> LossReading | None:
        """One epoch's steps; returns the reading of its last step (the epoch's one wait)."""
        spec, trainer = self.spec, self.trainer
        batches = _epoch_batches(self.dataset, self.on_device, self.protocol, spec.seed,
                                 (spec.task, spec.phase, epoch), spec.num_workers,
                                 self.policy.pin_memory)
        if spec.recorder is not None:
            spec.recorder.begin(epoch)
        for i, (x, y) in enumerate(batches):
            if i >= self.per_epoch:
                break
            loss = trainer.step(x, y)
            if trainer.sched_per_step:
                trainer.sched.step()
            self.running = loss if self.running is None else 0.9 * self.running + 0.1 * loss
            self.stats.steps += 1
            if spec.recorder is not None:
                spec.recorder.step(i, loss, y)
            self._report(self.monitor.offer(self.stats.steps, loss, self.running,
                                            report=i == self.per_epoch - 1,
                                            nonfinite=trainer.nonfinite_peak), epoch)
            self.bar.update(1)
        return self._report(self.monitor.settle(), epoch)

    def _report(self, reading: LossReading | None, epoch: int) -> LossReading | None:
        if reading is not None:
            self.trainer.check_finite(reading)
            self.bar.set_postfix(epoch=f"{epoch + 1}/{self.protocol.epochs}",
                                 loss=f"{reading.running:.3f}",
                                 lr=f"{self.trainer.opt.param_groups[0]['lr']:.1e}",
                                 refresh=False)
        return reading

    def _after_epoch(self, epoch: int, last_step: LossReading | None) -> None:
        """The epoch's record, schedule step, log line and (when due) checkpoint."""
        spec, trainer = self.spec, self.trainer
        if spec.recorder is not None:
            spec.recorder.end(epoch, trainer.opt.param_groups[0]["lr"])
        if not trainer.sched_per_step:
            trainer.sched.step()
        if not spec.progress:  # no bar (e.g. output to a log): one line per epoch instead
            log.info("task %d [%s] epoch %d/%d: loss %.4f", spec.task + 1, spec.phase,
                     epoch + 1, self.protocol.epochs,
                     float("nan") if last_step is None else last_step.running)
        now = time.perf_counter()
        last = epoch + 1 == self.protocol.epochs
        if spec.checkpoint is not None and (last or self.every.due(
                epoch + 1 - self.saved_epoch, now - self.saved_at)):
            self.stats.seconds, self.start = self.stats.seconds + now - self.start, now
            self.stats.final_loss = self._final_loss()
            save_checkpoint(spec.checkpoint, trainer, epoch + 1, self.stats, self.running)
            self.saved_at, self.saved_epoch = time.perf_counter(), epoch + 1

    def _final_loss(self) -> float:
        return float(self.running) if self.running is not None else float("nan")


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
