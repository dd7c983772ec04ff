"""Pool pretraining from the command line (:func:`nws.pretrain.pretrain`, paper §4.2) on an
ImageFolder tree and an architecture of the suite.

    python -m benchmarks.pretrain --data /data/imagenet/train --out runs/pools [--rule ema]
    torchrun --nproc-per-node 8 -m benchmarks.pretrain --data ... --out ...     # DDP

Every :class:`nws.pretrain.PretrainConfig` field is a flag (``--help`` names each default's
source). The result, ``<out>/pools.pt``, feeds the suite (``--opt pools=<out>/pools.pt``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from benchmarks.data.files import image_folder as checked_tree
from benchmarks.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from benchmarks.models import archs
from nws.pretrain import PretrainConfig, init_nws_model, pretrain


def image_folder(root: str | Path, size: int) -> Dataset:
    """The class-folder tree at ``root`` under the suite's one listing rule (hidden entries
    and non-image files are never classes or samples; images checked by header first)."""
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return checked_tree(Path(root), tf)


def parse_args(argv: list[str] | None = None) -> tuple[PretrainConfig, dict[str, Any]]:
    """The config (every field a flag; booleans as ``--x/--no-x``) and the run's own
    arguments (``data``, ``out``, ``arch``, ``image_size``)."""
    defaults = PretrainConfig()
    p = argparse.ArgumentParser(prog="python -m benchmarks.pretrain",
                                description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="ImageFolder root (class folders)")
    p.add_argument("--out", required=True)
    p.add_argument("--arch", default="resnet18", help="a name from benchmarks.models.archs.ARCHS")
    p.add_argument("--image-size", type=int, default=224)
    for f in fields(PretrainConfig):
        flag, value, help_ = "--" + f.name.replace("_", "-"), getattr(defaults, f.name), \
            f.metadata.get("help")
        if f.name == "milestones":
            p.add_argument(flag, type=int, nargs="*", default=list(value), help=help_)
        elif f.name == "max_steps":
            p.add_argument(flag, type=int, default=None, help=help_)
        elif isinstance(value, bool):  # --nesterov / --no-nesterov, --sync-bn / --no-sync-bn
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value,
                           help=help_)
        else:
            p.add_argument(flag, type=type(value), default=value, help=help_)
    args = vars(p.parse_args(argv))
    run = {k: args.pop(k) for k in ("data", "out", "arch", "image_size")}
    args["milestones"] = tuple(args["milestones"])
    return PretrainConfig(**args), run


def main(argv: list[str] | None = None) -> Path:
    cfg, run = parse_args(argv)
    data, out, arch, size = run["data"], run["out"], run["arch"], run["image_size"]
    device = None
    if "LOCAL_RANK" in os.environ:  # torchrun
        local = int(os.environ["LOCAL_RANK"])
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
    dataset = image_folder(data, size)
    model = init_nws_model(archs.build(arch, len(dataset.classes)), cfg)
    try:
        return pretrain(model, dataset, cfg, out, device)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
