"""Tasks and benchmarks, and the in-memory image data set the small benchmarks share."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from benchmarks.data.batches import BatchAugment, DeviceBatches

DATA_ROOT_ENV = "NWS_DATA_ROOT"


class DataUnavailableError(RuntimeError):
    """Data is missing or malformed; the message says what is expected and where."""


def default_data_root() -> Path:
    """``$NWS_DATA_ROOT`` if set, else ``~/.cache/nws_bench/data`` (always absolute)."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "nws_bench" / "data"


@dataclass
class Task:
    index: int
    name: str
    classes: list[str]
    train: Dataset
    test: Dataset

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Benchmark:
    name: str
    tasks: list[Task]
    synthetic: bool = False
    default_pretrained: str = "imagenet"
    input_size: int = 32
    notes: str = ""

    def subset(self, n_tasks: int | None) -> Benchmark:
        if n_tasks is None:
            return self
        if not 1 <= n_tasks <= len(self.tasks):
            raise ValueError(f"--tasks must be in 1..{len(self.tasks)} for {self.name}")
        return Benchmark(
            self.name, self.tasks[:n_tasks], self.synthetic, self.default_pretrained,
            self.input_size, self.notes,
        )


class TensorImages(Dataset):
    """uint8 images (N, C, H, W) and labels held in memory; transforms run on tensors.

    ``transform`` works on one image in [0, 1] (the DataLoader path); ``batch_augment``, when
    given, is the same transform on whole uint8 batches (the data-on-device path,
    :mod:`benchmarks.data.batches`). Without it, a batch is only scaled to [0, 1].
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        batch_augment: BatchAugment | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images, self.labels, self.transform = images, labels.long(), transform
        channels = images.shape[1]
        self.batch_augment = batch_augment or BatchAugment((0.0,) * channels, (1.0,) * channels)
        if transform is not None and batch_augment is None:
            self.batch_augment = None  # a per-image transform without a batch twin

    def on_device(self, device: torch.device, crop_resample: str = "batched") -> DeviceBatches:
        """This data set as one tensor on ``device`` (built once per device and resampling,
        then reused); ``crop_resample``: :class:`DevicePolicy`'s choice."""
        if self.batch_augment is None:
            raise ValueError("this data set has no batch transform; use a DataLoader")
        cached = getattr(self, "_device_batches", None)
        if cached is None or not cached.serves(device, crop_resample):
            cached = DeviceBatches(self.images, self.labels, self.batch_augment, device,
                                   crop_resample)
            self._device_batches = cached
        return cached

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])
