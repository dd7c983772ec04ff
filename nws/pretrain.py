"""Pool pretraining by weight distillation (paper §4.2), on any ImageFolder data set.

    python -m nws.pretrain --data /data/imagenet/train --out runs/pools [--rule ema]
    torchrun --nproc-per-node 8 -m nws.pretrain --data ... --out ...     # DDP

An NWS model (temporary kernels kaiming-normal, pools N(0, 1)) is trained with
CE + similarity term while the pools learn: ``ema`` (authors' code, default: VQ-VAE EMA,
decay 0.99, eps 1e-5, one update per optimiser step) or ``gradient`` (paper Eq. 3/4: the pools
are trained by beta x mean((sg(W) - K)^2)). Under DDP every rank holds the same W after each
step, so the assignments and therefore the EMA pools agree without communication; pool
gradients (gradient rule) are all-reduced by hand because pools are buffers.

Resumable: ``<out>/checkpoint.pt`` is replaced atomically after every epoch and a rerun of the
same command continues from it. AMP: bf16 by default on CUDA (the authors saw NaN with fp16);
fp16 runs with loss scaling; a non-finite loss skips the step (no pool update) and more than
``max_bad_steps`` in a row stop the run. The result, ``<out>/pools.pt``, feeds the suite
(``--opt pools=<out>/pools.pt``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from nws.convert import distillation_loss, nws_layers, nwsify, similarity_loss
from nws.ema import DECAY, EPS, ema_update, enable_ema
from nws.pools_io import pools_file_from_model, save_pools

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class PretrainConfig:
    epochs: int = 160  # authors' code
    lr: float = 0.01  # authors' code
    milestones: tuple[int, ...] = (100,)  # authors' code: x0.1 at epoch 100
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 256  # per process (authors: 2048 over 8 GPUs)
    pool_size: int = 512
    group_size: int = 1
    rule: str = "ema"  # "ema" (authors' code) | "gradient" (paper Eq. 3/4)
    beta: float = 1.0  # weight of the similarity / distillation terms
    decay: float = DECAY
    eps: float = EPS
    amp: str = "bf16"  # "bf16" | "fp16" | "none" (CUDA only)
    max_steps: int | None = None  # stop early (smoke runs)
    max_bad_steps: int = 20
    seed: int = 0
    workers: int = 4


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


def _autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def pretrain(model: nn.Module, data: Dataset, cfg: PretrainConfig, out: str | Path,
             device: torch.device | None = None) -> Path:
    """Train ``model`` (from :func:`init_nws_model`) on ``data``; returns the pools file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank = dist.get_rank() if _is_dist() else 0
    model.to(device)
    pools = [layer.pool for layer in nws_layers(model).values()]
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params}] + ([{"params": pools}] if cfg.rule == "gradient" else [])
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), 0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp == "fp16")
    start_epoch, step = 0, 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
    net = model
    if _is_dist():
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # pools agree by construction (module docstring)
    bad = 0
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
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, cfg.amp):
                loss = F.cross_entropy(net(x), y)
            loss = loss + cfg.beta * similarity_loss(model)
            if cfg.rule == "gradient":
                loss = loss + cfg.beta * distillation_loss(model)
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                bad += 1
                if bad > cfg.max_bad_steps:
                    raise FloatingPointError(f"loss non-finite for {bad} steps at step {step}; "
                                             "use --amp bf16 or none, or lower --lr")
                continue
            bad = 0
            scaler.scale(loss).backward()
            if cfg.rule == "gradient" and _is_dist():
                for p in pools:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
            if cfg.rule == "ema":
                ema_update(model, cfg.decay, cfg.eps)  # assignments of this step's forward
            scaler.step(opt)
            scaler.update()
            step += 1
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
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


def image_folder(root: str | Path, size: int) -> Dataset:
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return datasets.ImageFolder(str(root), tf)


def main(argv: list[str] | None = None) -> Path:
    defaults = PretrainConfig()
    p = argparse.ArgumentParser(prog="python -m nws.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="ImageFolder root (class folders)")
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default="resnet18", help="a name from benchmarks.archs.ARCHS")
    p.add_argument("--image-size", type=int, default=224)
    for field, value in asdict(defaults).items():
        flag = "--" + field.replace("_", "-")
        if field == "milestones":
            p.add_argument(flag, type=int, nargs="*", default=list(value))
        elif field == "max_steps":
            p.add_argument(flag, type=int, default=None)
        else:
            p.add_argument(flag, type=type(value), default=value)
    args = vars(p.parse_args(argv))
    data, out, arch, size = (args.pop(k) for k in ("data", "out", "arch", "image_size"))
    args["milestones"] = tuple(args["milestones"])
    cfg = PretrainConfig(**args)
    device = None
    if "LOCAL_RANK" in os.environ:  # torchrun
        local = int(os.environ["LOCAL_RANK"])
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
    from benchmarks import archs

    dataset = image_folder(data, size)
    model = init_nws_model(archs.build(arch, len(dataset.classes)), cfg)
    try:
        return pretrain(model, dataset, cfg, out, device)
    finally:
        if _is_dist():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
