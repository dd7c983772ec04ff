"""CI check 2: ResNet-18 counts equal the hand-derived ones (docs/reference.md §2)."""

from __future__ import annotations

from analysis.counts import arch_counts, class_counts
from analysis.runs import PAPER_POOL_SIZE

MIB = 2**20


def test_resnet18_kernel_counts() -> None:
    c = arch_counts("resnet18")
    stem = [x for x in c.convs if x.kernel_size == 49]
    three = [x for x in c.convs if x.kernel_size == 9]
    shortcuts = [x for x in c.convs if x.kernel_size == 1]
    assert (len(stem), len(three), len(shortcuts)) == (1, 16, 3)
    assert stem[0].kernels == 192
    assert sum(x.kernels for x in three) == 1_220_608
    assert sum(x.kernels for x in shortcuts) == 172_032
    assert c.head_kernels(5) == 2_560
    assert c.indices_per_task(5) == 1_395_392
    assert c.conv_weights == 11_166_912


def test_resnet18_bn_params_and_pools() -> None:
    c = arch_counts("resnet18")
    assert len(c.bn_channels) == 20 and sum(c.bn_channels) == 4_800
    assert c.imagenet_params == 11_689_512
    assert round(c.imagenet_params * 4 / MIB, 2) == 44.59
    assert c.nws_layers == 21
    # one pool of 512 entries per NWS layer; entry floats: 7x7 stem, 16 3x3, 3+1 1x1
    assert c.nws_layers * PAPER_POOL_SIZE == 10_752
    assert c.pool_entry_floats() == 49 + 16 * 9 + 4


def test_class_counts_need_no_data() -> None:
    assert class_counts("split_cifar100") == [5] * 20
    assert class_counts("cub_to_sketches") == [200, 196, 102, 195, 250]
    assert class_counts("split_digits") == [2] * 5
