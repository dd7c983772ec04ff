"""Split-CIFAR-100 train augmentation throughput, per-image DataLoader path against batches on
the device, timed in interleaved rounds in one process (images/s, ratio of medians).

    python -m benchmarks.perf.throughput [--images 2500] [--rounds 7] [--device cpu]
    python -m benchmarks.perf.throughput --cub uncropped|cropped [--images 64]

Synthetic CIFAR-shaped uint8 data (one task: 2,500 images, 32x32x3, batch 32), the
transforms of task 0 (RandomCrop(32, pad 4), flip, per-superclass normalisation). Each round
draws one whole epoch from each path (order and augmentation seeded as in training).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torchvision import transforms as T

from benchmarks.data.base import TensorImages
from benchmarks.data.batches import RESAMPLE_PATHS, BatchAugment
from benchmarks.data.split_cifar100 import NORMALISATION


def cifar_like_task(n: int) -> TensorImages:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (n,), generator=g)
    mean, std = NORMALISATION[0]
    per_image = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                           T.Normalize(mean, std)])
    return TensorImages(images, labels, per_image, BatchAugment(mean, std, pad=4, flip=True))


def _time_epoch(batches) -> float:
    start = time.perf_counter()
    for x, _ in batches:
        x.sum()  # touch the batch (a device path would otherwise only queue work)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(n: int = 2500, rounds: int = 7, device: str = "cpu", batch_size: int = 32
            ) -> dict[str, float]:
    """Median images/s of each path and their ratio."""
    from benchmarks.core.device_policy import DevicePolicy
    from benchmarks.core.protocols import resolve_protocol
    from benchmarks.engine.training import _epoch_batches

    data = cifar_like_task(n)
    policy = DevicePolicy.for_device(device)
    on_device = data.on_device(policy.device, policy.crop_resample)
    proto = resolve_protocol("paper", "split_cifar100")
    per_image, batched = [], []
    for r in range(rounds):
        coords = (0, "train", r)
        per_image.append(_time_epoch(_epoch_batches(data, None, proto, 1993, coords, 0)))
        batched.append(_time_epoch(_epoch_batches(data, on_device, proto, 1993, coords, 0)))
    old, new = n / statistics.median(per_image), n / statistics.median(batched)
    return {"per_image_images_per_s": old, "batched_images_per_s": new, "ratio": new / old}


def jpeg_folder(root: Path, n: int, size: tuple[int, int] = (500, 375)) -> None:
    """``n`` random JPEGs of ``size`` (CUB's typical 500x375) in two class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.jpg", quality=90)


def measure_cub(n: int = 64, rounds: int = 3, device: str = "cpu", cropped: bool = False,
                batch_size: int = 32) -> dict[str, float]:
    """CUB-to-Sketches train pipeline on generated JPEGs: per-image decode + transforms
    (DataLoader, main process) against the decoded cache + batches on the device (after the
    cache is built; its one-time build rate is reported too)."""
    from torchvision import datasets

    from benchmarks.core.device_policy import DevicePolicy
    from benchmarks.core.protocols import resolve_protocol
    from benchmarks.data import cub_to_sketches as cub
    from benchmarks.data.decode_cache import DecodedImages
    from benchmarks.engine.training import _epoch_batches

    with tempfile.TemporaryDirectory() as tmp:
        jpeg_folder(Path(tmp) / "train", n)
        train_tf, _ = cub.transforms(cropped)
        folder = datasets.ImageFolder(str(Path(tmp) / "train"), train_tf)
        step, size = cub.first_step(cropped)
        train_aug, _ = cub.batch_transforms(cropped)
        data = DecodedImages(folder, step, size, train_aug, Path(tmp) / "cache", "bench",
                             progress=False)
        policy = DevicePolicy.for_device(device)
        start = time.perf_counter()
        data.images()
        build = time.perf_counter() - start
        proto = resolve_protocol("paper", "cub_to_sketches").with_overrides(
            batch_size=batch_size)
        paths = {r: data.on_device(policy.device, r) for r in RESAMPLE_PATHS}
        per_image, cached = [], {r: [] for r in RESAMPLE_PATHS}
        for r in range(rounds):  # interleaved: a drift in machine speed hits every path
            coords = (0, "train", r)
            per_image.append(_time_epoch(_epoch_batches(data, None, proto, 1993, coords, 0)))
            for name, on_device in paths.items():
                cached[name].append(_time_epoch(_epoch_batches(data, on_device, proto, 1993,
                                                               coords, 0)))
    old = n / statistics.median(per_image)
    rates = {name: n / statistics.median(times) for name, times in cached.items()}
    new = rates[policy.crop_resample]
    return {"per_image_images_per_s": old, "batched_images_per_s": new, "ratio": new / old,
            "cache_build_images_per_s": n / build, "crop_resample": policy.crop_resample,
            **{f"{name}_resample_images_per_s": v for name, v in rates.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf.throughput",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2500)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cub", choices=["cropped", "uncropped"], default=None,
                   help="CUB-to-Sketches' pipeline on generated 500x375 JPEGs instead")
    args = p.parse_args(argv)
    from benchmarks.core.device_policy import DevicePolicy

    try:  # a bad --device, $NWS_CROP_RESAMPLE or $NWS_SEARCH: exit 2, not a traceback
        DevicePolicy.for_device(args.device)
    except ValueError as err:
        p.error(str(err))
    if args.cub:
        out = measure_cub(args.images if args.images != 2500 else 64, args.rounds,
                          args.device, cropped=args.cub == "cropped")
        others = ", ".join(f"{r}: {out[f'{r}_resample_images_per_s']:,.1f}"
                           for r in RESAMPLE_PATHS)
        print(f"CUB-to-Sketches ({args.cub}) per-image decode + transforms: "
              f"{out['per_image_images_per_s']:,.1f} images/s | cached batches on "
              f"{args.device} ({out['crop_resample']} resampling, the policy's): "
              f"{out['batched_images_per_s']:,.1f} images/s | {out['ratio']:.1f}x "
              f"(crops resampled {others} images/s; one-time cache build: "
              f"{out['cache_build_images_per_s']:,.1f} images/s)")
        return 0
    out = measure(args.images, args.rounds, args.device)
    print(f"per-image DataLoader: {out['per_image_images_per_s']:,.0f} images/s | batches on "
          f"{args.device}: {out['batched_images_per_s']:,.0f} images/s | "
          f"{out['ratio']:.1f}x (torch threads: {torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
