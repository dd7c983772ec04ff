"""Whole-batch augmentation on the training device, and a seeded batch iterator over a task
held as one uint8 tensor there (the in-memory benchmarks: split_cifar100, split_digits,
synthetic).

:class:`BatchAugment` draws, per image, the same random choices as the per-image transforms
it replaces (torchvision's ``RandomCrop(size, padding=pad)`` with zero fill, then
``RandomHorizontalFlip(0.5)``, then ``Normalize(mean, std)`` of the image in [0, 1]): a crop
offset (dy, dx) uniform over {0..2*pad}^2, a flip with probability 1/2, the same
normalisation. The draws come from one seeded generator per (seed, task, phase, epoch) on
the device, so a batch is a pure function of its coordinates; the numbers differ from the
per-image path's (another generator), the distribution does not (tests/data/test_batches.py).

The task is padded and mirrored once (:meth:`BatchAugment.prepare`, 2 x the padded task's
bytes: 24 MB for a Split-CIFAR task); each batch is then one index into that source's crop
windows and a normalisation: no Python loop per image, static shapes, no host sync.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from benchmarks.core.device_policy import RESAMPLE_PATHS


@dataclass(frozen=True)
class BatchAugment:
    """Random crop (zero padding ``pad``), optional horizontal flip, normalisation, then
    optional Cutout (``cutout`` x ``cutout`` zeros after normalising, as
    :class:`benchmarks.data.transforms.Cutout`).

    Without randomness (``pad=0``, no flip, no cutout) it is the test-time transform: a
    centre crop to ``center`` pixels when given, then normalisation.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int = 0
    flip: bool = False
    cutout: int = 0
    center: int | None = None

    @property
    def random(self) -> bool:
        return self.pad > 0 or self.flip or self.cutout > 0

    def draw(self, n: int, generator: torch.Generator | None, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image crop offsets (n, 2) in [0, 2*pad] (int64) and flips (n,) (bool)."""
        offsets = (torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator,
                                 device=device) if self.pad else
                   torch.zeros(n, 2, dtype=torch.int64, device=device))
        flips = (torch.rand(n, generator=generator, device=device) < 0.5 if self.flip else
                 torch.zeros(n, dtype=torch.bool, device=device))
        return offsets, flips

    def placed(self, resample: str) -> BatchAugment:
        """Itself: crops of a fixed size need no resampling (see ResizedCropAugment)."""
        return self

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
        x = self.normalise(x)
        return cutout(x, self.cutout, generator) if self.cutout else x

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``, per channel (after a
        centre crop to ``center`` when given, with torchvision's rounding of its offsets)."""
        if self.center is not None and not self.random:
            h, w = x.shape[-2:]
            top, left = round((h - self.center) / 2), round((w - self.center) / 2)
            x = x[..., top:top + self.center, left:left + self.center]
        scale, shift = _affine(self.mean, self.std, x.device)
        return x.float().mul_(scale).sub_(shift)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 (B, C, H, W), augmented and normalised."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("BatchAugment takes a uint8 batch (B, C, H, W)")
        if not self.random:
            return self.normalise(images)
        index = torch.arange(len(images), device=images.device)
        return self.take(self.prepare(images), index, generator)


@functools.lru_cache(maxsize=64)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / 255 - mean) / std as x * scale - shift, (1, C, 1, 1) each: two passes, not three
    (equal to torchvision's Normalize of x / 255 to float32 rounding, ~1e-7 relative).
    Cached per device: a fresh host-to-device copy per batch would stall the host until the
    GPU caught up (a pageable copy synchronises)."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return (1 / (255 * s)).float().to(device), (m / s).float().to(device)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """Zero one ``size`` x ``size`` square per image of ``x`` (B, C, H, W) at a uniformly
    drawn centre, clipped at the borders (rows [cy - size/2, cy + size/2) as
    :class:`benchmarks.data.transforms.Cutout`); in place, returns ``x``."""
    b, _, h, w = x.shape
    half = size // 2
    cy = torch.randint(0, h, (b, 1), generator=generator, device=x.device)
    cx = torch.randint(0, w, (b, 1), generator=generator, device=x.device)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= cy - half) & (rows < cy + half)  # (B, H)
    in_cols = (cols >= cx - half) & (cols < cx + half)  # (B, W)
    return x.masked_fill_((in_rows[:, None, :, None] & in_cols[:, None, None, :]), 0.0)


@functools.lru_cache(maxsize=64)
def _fallback_box(height: int, width: int, ratio: tuple[float, float], device: torch.device
                  ) -> torch.Tensor:
    """torchvision's centre-crop fallback of RandomResizedCrop (top, left, h, w), float64,
    cached per device (no host-to-device copy per batch)."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), float(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = float(round(height * ratio[1])), float(height)
    else:
        fw, fh = float(width), float(height)
    return torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw],
                        dtype=torch.float64).to(device)


@dataclass(frozen=True)
class ResizedCropAugment:
    """torchvision's ``RandomResizedCrop(size)`` (scale (0.08, 1), ratio (3/4, 4/3), up to 10
    tries, then the centre-crop fallback), horizontal flip, normalisation and Cutout, on
    whole uint8 batches: the boxes are drawn as torchvision draws them, all tries at once.
    Bilinear resampling without antialiasing (unlike PIL's resize: a downscaled crop is a
    little sharper), in one of two ways (``resample``, chosen by
    :class:`benchmarks.core.device_policy.DevicePolicy`; the same boxes, flips and Cutout):

    - ``"batched"``: one ``grid_sample`` of the whole batch (float), no host read: the
      path for a GPU, where a per-image loop would sync and launch per image;
    - ``"per_image"``: each box cut from the uint8 source and resized by
      ``F.interpolate`` in PyTorch's uint8 kernel (channels-last), uint8 like PIL's
      output; reads the boxes on the host, so CPU only, where it is the faster path
      (measured: docs/performance.md, Data pipeline).

    Both equal torchvision's ``resized_crop(antialias=False)`` away from the box edges, to
    float rounding (batched) or within one uint8 level (per image: the uint8 kernel's
    fixed-point weights; measured: docs/performance.md, Data pipeline)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    cutout: int = 0
    tries: int = 10
    resample: str = "batched"  # "batched" | "per_image" (see the class doc)
    random = True

    def placed(self, resample: str) -> ResizedCropAugment:
        """This augmentation with the resampling a device policy chose."""
        if resample not in RESAMPLE_PATHS:
            raise ValueError(f"crop resampling {resample!r}; valid: {', '.join(RESAMPLE_PATHS)}")
        return self if resample == self.resample else replace(self, resample=resample)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """The source crops are cut from: channels-last for the per-image path (PyTorch's
        uint8 resize kernel is fastest there), else ``images`` as they are."""
        if self.resample == "per_image":
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def boxes(self, n: int, height: int, width: int, generator: torch.Generator | None,
              device: torch.device) -> torch.Tensor:
        """(n, 4) float boxes (top, left, h, w) in pixels, as ``RandomResizedCrop.get_params``
        draws them (first of ``tries`` valid draws, else the ratio-clamped full image)."""
        area = height * width
        u = torch.rand(n, self.tries, 4, generator=generator, device=device,
                       dtype=torch.float64)
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[..., 0])
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lo + (hi - lo) * u[..., 1])
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.float().argmax(1, keepdim=True)  # first valid try (0 if none)
        pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
        w, h, ok_any = pick(w), pick(h), ok.any(1)
        top = torch.floor(pick(u[..., 2]) * (height - h + 1))
        left = torch.floor(pick(u[..., 3]) * (width - w + 1))
        fallback = _fallback_box(height, width, self.ratio, device)
        drawn = torch.stack([top, left, h, w], 1)
        return torch.where(ok_any[:, None], drawn, fallback).float()

    def take(self, source: torch.Tensor, index: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``index`` of ``source`` (N, C, H, W) uint8: float32 (B, C, size, size)."""
        height, width = source.shape[-2:]
        box = self.boxes(len(index), height, width, generator, source.device)
        flips = (torch.rand(len(index), generator=generator, device=source.device) < 0.5
                 if self.flip else torch.zeros(len(index), dtype=torch.bool,
                                               device=source.device))
        resize = self._per_image if self.resample == "per_image" else self._batched
        x = resize(source, index, box, flips)
        scale, shift = _affine(self.mean, self.std, x.device)
        x = x.mul_(scale).sub_(shift)
        return cutout(x, self.cutout, generator) if self.cutout else x

    def _batched(self, source: torch.Tensor, index: torch.Tensor, box: torch.Tensor,
                 flips: torch.Tensor) -> torch.Tensor:
        x = source[index].float()
        b, _, height, width = x.shape
        top, left, h, w = box.unbind(1)
        # Axis-aligned: output column u in [0, size) samples x = left + (u + 0.5) w / size
        # - 0.5 (pixels), i.e. (2 x + 1) / width - 1 in grid_sample's coordinates; mirrored
        # where flipped. Built per axis and broadcast (no per-pixel affine product).
        u = (torch.arange(self.size, device=x.device) + 0.5) / self.size  # (size,)
        u_x = torch.where(flips[:, None], 1 - u, u)  # (B, size)
        gx = (2 * (left[:, None] + u_x * w[:, None])) / width - 1
        gy = (2 * (top[:, None] + u * h[:, None])) / height - 1
        grid = torch.stack([gx[:, None, :].expand(b, self.size, self.size),
                            gy[:, :, None].expand(b, self.size, self.size)], dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)

    def _per_image(self, source: torch.Tensor, index: torch.Tensor, box: torch.Tensor,
                   flips: torch.Tensor) -> torch.Tensor:
        out = torch.empty((len(index), source.shape[1], self.size, self.size),
                          dtype=torch.uint8, device=source.device)
        # torchvision draws whole-pixel boxes: the float boxes hold integers exactly
        rows = zip(index.tolist(), box.long().tolist(), flips.tolist(), strict=True)
        for k, (i, (top, left, h, w), flip) in enumerate(rows):
            crop = F.interpolate(source[i:i + 1, :, top:top + h, left:left + w],
                                 size=(self.size, self.size), mode="bilinear",
                                 align_corners=False, antialias=False)[0]
            out[k] = crop.flip(-1) if flip else crop
        return out.float()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("ResizedCropAugment is a training transform; use BatchAugment")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("ResizedCropAugment takes a uint8 batch (B, C, H, W)")
        return self.take(images, torch.arange(len(images), device=images.device), generator)


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

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 augment: BatchAugment | ResizedCropAugment, device: torch.device,
                 crop_resample: str = "batched") -> None:
        self.images = images.to(device, non_blocking=True)
        self.labels = labels.to(device, non_blocking=True).long()
        self.augment, self.device = augment.placed(crop_resample), device
        self.crop_resample = crop_resample
        self.source = self.augment.prepare(self.images) if augment.random else None
        if self.source is not None and self.source.shape == self.images.shape:
            self.images = self.source  # a re-layout only: keep one copy

    def serves(self, device: torch.device, crop_resample: str) -> bool:
        """Whether these batches are the ones ``on_device(device, crop_resample)`` asks for."""
        return (self.device, self.crop_resample) == (device, crop_resample)

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
