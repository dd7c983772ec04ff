"""Pool pretraining by weight distillation (paper §4.2), on any data set of (image, label).

The command line, on an ImageFolder tree and a suite architecture, is the suite's
(:mod:`benchmarks.models.pretrain`; this library imports nothing of the suite):

    python -m benchmarks.pretrain --data /data/imagenet/train --out runs/pools [--rule ema]
    torchrun --nproc-per-node 8 -m benchmarks.pretrain --data ... --out ...     # DDP

An NWS model (temporary kernels kaiming-normal, pools N(0, 1)) is trained with
CE + similarity term while the pools learn: ``ema`` (authors' code, default: VQ-VAE EMA,
decay 0.99, eps 1e-5, one update per optimiser step) or ``gradient`` (paper Eq. 3/4: the pools
are trained by beta x mean((sg(W) - K)^2)). Under DDP every rank holds the same W after each
step, so the assignments and therefore the EMA pools agree without communication; pool
gradients (gradient rule) are all-reduced by hand because pools are buffers.

Defaults are the authors' pretraining (docs/reference.md §1; ``--help`` names each value's source):
SGD lr 0.01 x0.1 at epoch 100 of 160, momentum 0.9 with Nesterov, weight decay 4e-5, beta 0.5,
SyncBatchNorm under DDP on GPUs (``--no-sync-bn`` opts out; CPU runs keep per-process BN).

Resumable: ``<out>/checkpoint.pt`` is replaced atomically after every epoch and a rerun of the
same command continues from it. AMP: bf16 by default on CUDA (the authors saw NaN with fp16);
fp16 runs with loss scaling; a non-finite loss skips the step on the device (no weight or pool
update; it still counts as a step) and more than ``max_bad_steps`` in a row stop the run (the
count is read every ``CHECK_EVERY`` steps and after each epoch: no host sync inside a step).
The result, ``<out>/pools.pt``, feeds the suite (``--opt pools=<out>/pools.pt``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from nws.convert import nws_layers, nwsify
from nws.ema import DECAY, EPS, ema_update_layer, enable_ema
from nws.layer import similarity_sum
from nws.optim import zero_momentum_buffers
from nws.pools_io import pools_file_from_model, save_pools

CODE = "authors' code"


def _opt(default: object, source: str, what: str = "") -> Any:
    """A config field whose ``--help`` names its source (docs/reference.md §1: authors'
    pretraining)."""
    return field(default=default, metadata={"help": f"{what} [{source}]".strip()})


@dataclass
class PretrainConfig:
    """Pretraining settings; defaults are the authors' ImageNet pretraining
    (docs/reference.md §1)."""

    epochs: int = _opt(160, CODE)
    lr: float = _opt(0.01, CODE, "initial SGD learning rate")
    milestones: tuple[int, ...] = _opt((100,), CODE, "epochs where lr is multiplied by 0.1")
    momentum: float = _opt(0.9, CODE)
    nesterov: bool = _opt(True, CODE, "Nesterov momentum (applies only with momentum > 0)")
    weight_decay: float = _opt(4e-5, CODE + " (paper §5.4's 1e-5 is for task learning)")
    batch_size: int = _opt(256, "ours: per process; authors' code: 2048 over 8 GPUs")
    pool_size: int = _opt(512, "paper §4.3")
    group_size: int = _opt(1, "paper §4.1")
    rule: str = _opt("ema", "ema: " + CODE + "; gradient: paper Eq. 3/4", "pool update rule")
    beta: float = _opt(0.5, CODE + "; paper §5.4 (Eq. 3)",
                       "weight of the similarity / distillation terms")
    decay: float = _opt(DECAY, CODE, "EMA decay of the pools")
    eps: float = _opt(EPS, CODE, "EMA Laplace smoothing")
    sync_bn: bool = _opt(True, CODE, "SyncBatchNorm when more than one process (DDP) runs "
                         "on GPUs; on CPU (gloo) BN stays per process")
    amp: str = _opt("bf16", "ours: the authors' fp16 gave NaN",
                    "bf16 | fp16 | none (CUDA only)")
    max_steps: int | None = _opt(None, "ours", "stop early (smoke runs)")
    max_bad_steps: int = _opt(20, "ours", "non-finite losses in a row before stopping")
    seed: int = _opt(0, "ours")
    workers: int = _opt(4, "ours", "data loader processes")


def init_nws_model(model: nn.Module, cfg: PretrainConfig) -> nn.Module:
    """Kaiming-normal temporary kernels and N(0, 1) pools (authors' initialisation).

    The draws come from a CPU generator seeded by ``cfg.seed`` and are then moved to each
    weight's device: the same initialisation for a model on CPU or CUDA."""
    g = torch.Generator().manual_seed(cfg.seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            with torch.no_grad():
                noise = torch.randn(m.weight.shape, generator=g)
                m.weight.copy_(noise.to(m.weight.device) * math.sqrt(2.0 / m.weight[0].numel()))
    nwsify(model, cfg.pool_size, cfg.group_size, generator=g)
    if cfg.rule == "ema":
        enable_ema(model)
    elif cfg.rule == "gradient":
        for layer in nws_layers(model).values():
            layer.pool.requires_grad_(True)
    else:
        raise ValueError(f"rule must be 'ema' or 'gradient', got {cfg.rule!r}")
    return model


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def use_sync_bn(cfg: PretrainConfig, world_size: int, device: torch.device) -> bool:
    """SyncBatchNorm as in the authors' DDP pretraining: more than one process, not opted out
    (``--no-sync-bn``), on an accelerator (torch's SyncBatchNorm refuses CPU tensors, so CPU
    runs under gloo keep per-process BN)."""
    return cfg.sync_bn and world_size > 1 and device.type != "cpu"


def with_sync_bn(model: nn.Module, cfg: PretrainConfig, world_size: int,
                 device: torch.device) -> nn.Module:
    """``model`` with every BN layer converted to SyncBatchNorm where :func:`use_sync_bn`
    says so (same parameters and state dict keys), else ``model`` unchanged."""
    if not use_sync_bn(cfg, world_size, device):
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def _atomic_save(obj: object, path: Path) -> None:
    from nws.atomic import atomic_path  # the suite's one atomic writer

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def make_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.SGD:
    """SGD over the trainable parameters (and the pools under the gradient rule); fused, so
    that a step whose loss is not finite is skipped on the device (``found_inf``), with its
    momentum buffers zeroed up front (a skipped first step would leave them unwritten:
    :func:`nws.optim.zero_momentum_buffers`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    pools = [layer.pool for layer in nws_layers(model).values()]
    groups = [{"params": params}] + ([{"params": pools}] if cfg.rule == "gradient" else [])
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov and cfg.momentum > 0,
                          weight_decay=cfg.weight_decay, fused=True)
    zero_momentum_buffers(opt)
    return opt


CHECK_EVERY = 50
"""Steps between reads of the non-finite count (one host sync each; none inside a step)."""


class PretrainStep:
    """One pretraining step without a host sync: forward, CE + beta x similarity (+ beta x
    distillation under the gradient rule), backward, the EMA pool update and the optimiser
    step, where a non-finite loss skips the update on the device (the fused SGD's
    ``found_inf``; the EMA keeps its state) and is counted there (:meth:`check` reads the
    count). The NWS layers are listed once, and their searchers' pool tables are refreshed
    in place when the EMA writes the pools (:class:`nws.layer.SearchGroup`)."""

    def __init__(self, net: nn.Module, model: nn.Module, opt: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, cfg: PretrainConfig, device: torch.device
                 ) -> None:
        self.net, self.opt, self.scaler, self.cfg, self.device = net, opt, scaler, cfg, device
        self.layers = list(nws_layers(model).values())
        self.pools = [layer.pool for layer in self.layers]
        self.bad = torch.zeros((), device=device)  # non-finite losses in a row now
        self.worst = torch.zeros((), device=device)  # the longest such run so far

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with _autocast(self.device, cfg.amp):
            loss = F.cross_entropy(self.net(x), y)
        loss = loss + cfg.beta * similarity_sum(self.layers, 1.0)
        if cfg.rule == "gradient":
            loss = loss + cfg.beta * torch.stack([m.distillation() for m in self.layers]).sum()
        finite = torch.isfinite(loss.detach())
        self.bad.add_(1).masked_fill_(finite, 0)
        torch.maximum(self.worst, self.bad, out=self.worst)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.rule == "gradient" and _is_dist():
            for p in self.pools:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        if cfg.rule == "ema":
            for layer in self.layers:  # assignments of this step's forward
                ema_update_layer(layer, cfg.decay, cfg.eps, apply=finite)
        if self.scaler.is_enabled():  # skips on non-finite gradients itself
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.found_inf = (~finite).float()  # type: ignore[attr-defined]
            self.opt.step()
        return loss.detach()

    def check(self, step: int) -> None:
        """``FloatingPointError`` when more than ``max_bad_steps`` steps in a row had a
        non-finite loss (a host read of the device count)."""
        worst = int(self.worst)
        if worst > self.cfg.max_bad_steps:
            raise FloatingPointError(f"loss non-finite for {worst} steps in a row by step "
                                     f"{step}; use --amp bf16 or none, or lower --lr")


def pretrain(model: nn.Module, data: Dataset, cfg: PretrainConfig, out: str | Path,
             device: torch.device | None = None) -> Path:
    """Train ``model`` (from :func:`init_nws_model`) on ``data``; returns the pools file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank = dist.get_rank() if _is_dist() else 0
    model = with_sync_bn(model, cfg, dist.get_world_size() if _is_dist() else 1, device)
    model.to(device)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), 0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp == "fp16")
    start_epoch, step = 0, 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        # read on the CPU, then placed: load_state_dict copies into the model's tensors and
        # the optimiser state follows its parameters' device (as the suite's phase checkpoints)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        if ckpt["scaler"] or not scaler.is_enabled():  # empty where written with scaling off
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
    net = model
    if _is_dist():
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # pools agree by construction (module docstring)
    train_step = PretrainStep(net, model, opt, scaler, cfg, device)
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # augmentation stream of this epoch
        if _is_dist():
            sampler = DistributedSampler(data, seed=cfg.seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(data, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        loader = DataLoader(data, cfg.batch_size, sampler=sampler, drop_last=len(data) >
                            cfg.batch_size, num_workers=cfg.workers,
                            pin_memory=device.type == "cuda")
        model.train()
        for x, y in loader:
            train_step(x, y)
            step += 1
            if step % CHECK_EVERY == 0:
                train_step.check(step)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        train_step.check(step)
        sched.step()
        if rank == 0:
            _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(),
                          "sched": sched.state_dict(), "scaler": scaler.state_dict(),
                          "epoch": epoch + 1, "step": step, "config": asdict(cfg)}, ckpt_path)
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
    target = out / "pools.pt"
    if rank == 0:
        save_pools(target, pools_file_from_model(model))
    return target
