"""Counts that need no data on disk: classes per task per benchmark, and architecture counts.

Class counts come from the benchmark modules' own constants where they exist (no data is
read); the two small benchmarks are fixed by their builders.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from benchmarks.models import archs


def class_counts(benchmark: str) -> list[int]:
    """Classes of each task, in task order, without the data."""
    if benchmark == "split_cifar100":
        from benchmarks.data.split_cifar100 import SUPERCLASSES

        return [len(fine) for fine in SUPERCLASSES.values()]  # 20 x 5
    if benchmark == "cub_to_sketches":
        from benchmarks.data.cub_to_sketches import DATASETS

        return [n for _, n, _ in DATASETS]  # 200, 196, 102, 195, 250
    fixed = {
        "split_digits": [2] * 5,  # benchmarks.data.split_digits: five digit pairs
        "synthetic": [2] * 3,  # benchmarks.data.synthetic.build defaults
    }
    if benchmark not in fixed:
        known = ["split_cifar100", "cub_to_sketches", *fixed]
        raise KeyError(f"no class-count table for benchmark {benchmark!r}; known: {known}")
    return fixed[benchmark]


@dataclass(frozen=True)
class Conv:
    name: str
    out_channels: int
    kernels: int  # out x in / groups: one pool index each under NWS
    kernel_size: int  # k_h x k_w: floats per kernel, and per pool entry

    @property
    def weights(self) -> int:
        return self.kernels * self.kernel_size


@dataclass(frozen=True)
class ArchCounts:
    """Everything the memory rules count, for one architecture."""

    arch: str
    convs: tuple[Conv, ...]
    bn_channels: tuple[int, ...]  # one entry per BatchNorm layer
    head_in: int  # classifier input width (NWS treats the head as a 1x1 conv)
    imagenet_params: int  # parameters of the model with its 1000-class head

    @property
    def kernels(self) -> int:
        return sum(c.kernels for c in self.convs)

    @property
    def conv_weights(self) -> int:
        return sum(c.weights for c in self.convs)

    @property
    def nws_layers(self) -> int:
        return len(self.convs) + 1

    def head_kernels(self, num_classes: int) -> int:
        return self.head_in * num_classes

    def indices_per_task(self, num_classes: int) -> int:
        """NWS pool indices of one task: one per conv kernel plus one per head weight."""
        return self.kernels + self.head_kernels(num_classes)

    def pool_entry_floats(self) -> int:
        """Floats in one pool entry summed over NWS layers (head: 1x1, one float)."""
        return sum(c.kernel_size for c in self.convs) + 1


@functools.cache
def arch_counts(arch: str) -> ArchCounts:
    model = archs.build(arch, archs.IMAGENET_CLASSES)
    head = archs.get_head(model, arch)
    convs, bns = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out_c, in_c, kh, kw = m.weight.shape
            convs.append(Conv(name, out_c, out_c * in_c, kh * kw))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            bns.append(m.num_features)
    params = sum(p.numel() for p in model.parameters())
    return ArchCounts(arch, tuple(convs), tuple(bns), head.in_features, params)
