"""Split-Digits: scikit-learn's bundled 8x8 digits (real images, offline), five tasks.

Task k holds digits (2k, 2k+1) with labels 0/1. Images are upsampled bilinearly to
``size`` x ``size`` (default 24) and repeated to 3 channels. The train/test
split is fixed (stratified, 1/3 test, drawn with seed 0) and does not depend on the run
seed, so every method sees the same tasks. Training augmentation: RandomCrop(size, padding
size/16) only (a flipped digit is another digit).

Why 24 (issue 17, the quick start's time): the digits are 8x8, so no size above that adds
information; what the size sets is the ResNet's spatial pipeline (its stem halves the input,
then three stages halve it again) and the cost of every convolution. At 24 the last stage
still sees 2x2 (as at CIFAR's 32), and every conv costs (24/32)^2 = 0.56x its cost at 32:
the whole mini (``python -m benchmarks.mini_timing``) ran faster at 24 than at 32 with every
task of every method still learned. At 16 the last stage sees 1x1 and the last task's
accuracy fell (NWS, AQD); measured: docs/performance.md, The quick start. The test suite's
"learns split_digits" checks run at 16 all the same (``size=16``), 4x cheaper than 32,
because they assert only that each method learns. ``--bench-opt size=32`` gives
CIFAR's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from benchmarks.core.checks import Range
from benchmarks.data.base import Benchmark, Task, TensorImages
from benchmarks.data.batches import BatchAugment

SPLIT_SEED = 0
TEST_FRACTION = 1 / 3


def _images(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    return x, torch.tensor(digits.target)


def _split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(len(idx) * TEST_FRACTION)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


SIZE = Range(8, 512, "pixels per side of the upsampled 8x8 digits: a multiple of 8; 512 is "
             "already 64x the source, and memory grows with its square", integer=True)


def build(data_root: Path | None = None, size: Annotated[int, SIZE] = 24) -> Benchmark:
    """The five tasks at ``size`` x ``size`` pixels (``data_root`` is unused: bundled data)."""
    size = int(size)
    if size < 8 or size % 8:
        raise ValueError(f"split_digits size must be a multiple of 8 (>= 8), got {size}")
    x, y = _images(size)
    train_idx, test_idx = _split(y.numpy())
    mean = tuple(x[train_idx].float().div(255).mean(dim=(0, 2, 3)).tolist())
    std = tuple(x[train_idx].float().div(255).std(dim=(0, 2, 3)).tolist())
    norm = T.Normalize(mean, std)
    train_tf = T.Compose([T.RandomCrop(size, padding=size // 16), norm])
    tasks = []
    for k in range(5):
        pair = (2 * k, 2 * k + 1)
        tr = train_idx[np.isin(y[train_idx].numpy(), pair)]
        te = test_idx[np.isin(y[test_idx].numpy(), pair)]
        tasks.append(
            Task(
                index=k,
                name=f"digits_{pair[0]}{pair[1]}",
                classes=[str(d) for d in pair],
                train=TensorImages(x[tr], y[tr] - pair[0], train_tf,
                                   BatchAugment(mean, std, pad=size // 16)),
                test=TensorImages(x[te], y[te] - pair[0], norm, BatchAugment(mean, std)),
            )
        )
    return Benchmark(
        "split_digits", tasks, default_pretrained="none", input_size=size,
        notes=f"scikit-learn digits at {size}x{size}, 5 two-class tasks, fixed split (seed 0)",
    )
