"""Whole-batch augmentation on the training device, and a seeded batch iterator over a task
held as one uint8 tensor there (the in-memory benchmarks: split_cifar100, split_digits,
synthetic).

:class:`BatchAugment` draws, per image, the same random choices as the per-image transforms
it replaces (torchvision's ``RandomCrop(size, padding=pad)`` with zero fill, then
``RandomHorizontalFlip(0.5)``, then ``Normalize(mean, std)`` of the image in [0, 1]): a crop
offset (dy, dx) uniform over {0..2*pad}^2, a flip with probability 1/2, the same
normalisation. The draws come from one seeded generator per (seed, task, phase, epoch) on
the device, so a batch is a pure function of its coordinates; the numbers differ from the
per-image path's (another generator), the distribution does not (tests/test_batches.py).

The task is padded and mirrored once (:meth:`BatchAugment.prepare`, 2 x the padded task's
bytes: 24 MB for a Split-CIFAR task); each batch is then one index into that source's crop
windows and a normalisation: no Python loop per image, static shapes, no host sync.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BatchAugment:
    """Random crop (zero padding ``pad``), optional horizontal flip, then normalisation.

    ``pad=0`` and ``flip=False`` give the deterministic test-time transform (normalise only).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 0
    flip: bool = False

    @property
    def random(self) -> bool:
        return self.pad > 0 or self.flip

    def draw(self, n: int, generator: torch.Generator | None, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image crop offsets (n, 2) in [0, 2*pad] (int64) and flips (n,) (bool)."""
        offsets = (torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator,
                                 device=device) if self.pad else
                   torch.zeros(n, 2, dtype=torch.int64, device=device))
        flips = (torch.rand(n, generator=generator, device=device) < 0.5 if self.flip else
                 torch.zeros(n, dtype=torch.bool, device=device))
        return offsets, flips

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The source batches are cut from, built once per task: ``images`` (N, C, H, W)
        zero-padded by ``pad``, stacked with their mirror images when ``flip``:
        (F, N, C, H + 2 pad, W + 2 pad) uint8, F = 2 with flips, else 1."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("BatchAugment takes uint8 images (N, C, H, W)")
        padded = F.pad(images, (self.pad,) * 4) if self.pad else images
        return torch.stack([padded, padded.flip(3)] if self.flip else [padded])

    def take(self, source: torch.Tensor, index: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``index`` (B,) of a ``source`` from :meth:`prepare`, cropped, flipped and
        normalised: float32 (B, C, H, W), one gather (no per-image loop, no host sync).

        A flipped crop at offset dx is the crop at 2 pad - dx of the mirrored padded image,
        so crop and flip are one index into ``source``'s (flip, image, dy, dx) windows."""
        hp, wp = source.shape[-2:]
        h, w = hp - 2 * self.pad, wp - 2 * self.pad
        offsets, flips = self.draw(len(index), generator, source.device)
        windows = source.unfold(3, h, 1).unfold(4, w, 1)  # (F, N, C, dy, dx, H, W): a view
        dx = torch.where(flips, 2 * self.pad - offsets[:, 1], offsets[:, 1])
        x = windows[flips.long(), index, :, offsets[:, 0], dx]  # (B, C, H, W)
        return self.normalise(x)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``, per channel."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return x.float().div_(255).sub_(mean).div_(std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 (B, C, H, W), augmented and normalised."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("BatchAugment takes a uint8 batch (B, C, H, W)")
        if not self.random:
            return self.normalise(images)
        index = torch.arange(len(images), device=images.device)
        return self.take(self.prepare(images), index, generator)


def crop_flip(images: torch.Tensor, pad: int, offsets: torch.Tensor, flips: torch.Tensor
              ) -> torch.Tensor:
    """Reference crop: each image of ``images`` (B, C, H, W) cut at ``offsets`` (B, 2: dy,
    dx in [0, 2*pad]) from its zero-padded copy, mirrored where ``flips`` (B,) is True."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    x = windows[torch.arange(b, device=images.device), :, offsets[:, 0], offsets[:, 1]]
    return torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)


def batches_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """Steps in one epoch over ``n`` samples. ``drop_last=False`` keeps the last partial
    batch, except one of a single image (BatchNorm cannot train on a batch of 1)."""
    full, rest = divmod(n, batch_size)
    if full == 0:  # a task smaller than one batch: one batch of everything
        return 1 if n else 0
    return full + (not drop_last and rest > 1)


def batch_sizes(n: int, batch_size: int, drop_last: bool) -> list[int]:
    """The size of each batch of one epoch, in order (all ``batch_size`` but maybe the last)."""
    steps = batches_per_epoch(n, batch_size, drop_last)
    return [min(batch_size, n - i * batch_size) for i in range(steps)]


class DeviceBatches:
    """One task's images (uint8, (N, C, H, W)) and labels on ``device``, served as augmented
    batches in a seeded order; build it once per task, then iterate epochs with
    :meth:`epoch`. Nothing is rebuilt per epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: BatchAugment,
                 device: torch.device) -> None:
        self.images = images.to(device, non_blocking=True)
        self.labels = labels.to(device, non_blocking=True).long()
        self.augment, self.device = augment, device
        self.source = augment.prepare(self.images) if augment.random else None

    def __len__(self) -> int:
        return len(self.images)

    def epoch(self, batch_size: int, order: torch.Generator, augment: torch.Generator | None,
              drop_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x float32 (B, C, H, W), y int64 (B,)) batches of one epoch: the permutation comes
        from ``order`` (a CPU generator, one host-to-device copy per epoch), augmentation
        from ``augment`` (a generator on the device)."""
        perm = torch.randperm(len(self), generator=order).to(self.device, non_blocking=True)
        start = 0
        for size in batch_sizes(len(self), batch_size, drop_last):
            idx = perm[start:start + size]
            start += size
            x = (self.augment.take(self.source, idx, augment) if self.source is not None
                 else self.augment.normalise(self.images[idx]))
            yield x, self.labels[idx]

    def ordered(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every image once, in order, all batches kept (evaluation)."""
        for start in range(0, len(self), batch_size):
            yield (self.augment(self.images[start:start + batch_size]),
                   self.labels[start:start + batch_size])


def device_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` (CPU, CUDA, ...) seeded with ``seed``."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
