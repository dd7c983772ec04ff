"""Index codecs: lossless round trips, exact fixed-width size, entropy coding near the limit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nws import codec


def _layers(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    skewed = rng.choice(512, size=20000, p=np.arange(512, 0, -1) / np.arange(513).sum())
    return [rng.integers(0, 512, 3001), skewed, np.zeros(0, np.int64), np.full(9, 511),
            rng.integers(0, 3, 5000)]


@pytest.mark.parametrize("name", codec.CODECS)
def test_round_trip(name: str) -> None:
    layers = _layers()
    data = codec.encode(layers, 512, name)
    back = codec.decode(data, [len(a) for a in layers], 512, name)
    assert all(np.array_equal(a, b) for a, b in zip(layers, back, strict=True))


def test_fixed_width_size_is_nine_bits_per_index_rounded_up() -> None:
    layers = _layers()
    count = sum(len(a) for a in layers)
    assert len(codec.encode(layers, 512, "fixed")) == math.ceil(9 * count / 8)
    assert codec.fixed_nbytes([len(a) for a in layers], 512) == math.ceil(9 * count / 8)
    assert len(codec.encode([np.arange(7)], 8, "fixed")) == math.ceil(3 * 7 / 8)


def test_entropy_coding_approaches_the_empirical_entropy() -> None:
    rng = np.random.default_rng(1)
    layers = [rng.integers(0, 4, 40000), rng.choice(512, 40000, p=np.full(512, 1 / 512))]
    h = codec.empirical_entropy_bits(layers, 512)
    assert h == pytest.approx((2 + 9) / 2, abs=0.02)
    bits = 8 * len(codec.encode(layers, 512, "entropy")) / 80000
    assert h <= bits < h + 0.15  # the histograms and stream padding cost the difference


# -- delta: a task against the task before it -------------------------------------------

# ResNet-18's NWS layers (kernels per layer, 2-class head): a realistic task, 1,393,856 indices
RESNET18 = [192, *[4096] * 4, 8192, 16384, 16384, 16384, 8192, 32768, 65536, 65536, 65536,
            32768, 131072, 262144, 262144, 262144, 131072, 1024]


def _chain(tasks: int, changed: float, skew: float, seed: int = 0) -> list[list[np.ndarray]]:
    """Index chains like NWS's: task 0 drawn per layer from a distribution over 512 entries
    (``skew`` = 0: uniform; larger: fewer entries used, as in early layers), each later task
    the one before with a share ``changed`` of positions redrawn from that distribution."""
    rng = np.random.default_rng(seed)
    probs = [rng.dirichlet(np.full(512, 1 / skew)) if skew else np.full(512, 1 / 512)
             for _ in RESNET18]
    chain = [[rng.choice(512, d, p=p) for d, p in zip(RESNET18, probs, strict=True)]]
    for _ in range(1, tasks):
        layers = []
        for a, p in zip(chain[-1], probs, strict=True):
            a = a.copy()
            where = rng.random(len(a)) < changed
            a[where] = rng.choice(512, int(where.sum()), p=p)
            layers.append(a)
        chain.append(layers)
    return chain


def test_delta_round_trip_with_resized_layers_and_edge_cases() -> None:
    rng = np.random.default_rng(3)
    prev = [rng.integers(0, 512, 300), rng.integers(0, 512, 50), rng.integers(0, 512, 40),
            np.zeros(0, np.int64), rng.integers(0, 512, 20)]
    layers = [prev[0].copy(),  # nothing changed
              rng.integers(0, 512, 50),  # (nearly) everything changed
              np.concatenate([prev[2], rng.integers(0, 512, 24)]),  # a head that grew
              rng.integers(0, 512, 5),  # a layer new in full
              prev[4][:7]]  # a head that shrank
    layers[0][[3, 77]] = [511, 0]
    data = codec.encode_delta(layers, prev, 512)
    back = codec.decode_delta(data, [len(a) for a in layers], prev, 512)
    assert all(np.array_equal(a, b) for a, b in zip(layers, back, strict=True))
    assert codec.changed_fraction(layers, prev) == pytest.approx(
        (2 + int((layers[1] != prev[1]).sum()) + 24 + 5 + 0) / sum(map(len, layers)))
    with pytest.raises(ValueError, match="same architecture"):
        codec.encode_delta(layers, prev[:-1], 512)


@pytest.mark.parametrize("skew", [0.0, 4.0], ids=["near-uniform", "skewed"])
def test_delta_coding_is_within_005_bit_of_its_conditional_entropy_bound(skew: float) -> None:
    """90% of indices unchanged, ResNet-18's 21 layers: the stored size against the bound
    the codec reports (order-0 entropy of each layer's change mask plus its new values)."""
    prev, layers = _chain(2, changed=0.1, skew=skew, seed=int(skew))
    count = sum(RESNET18)
    bound = codec.delta_entropy_bits(layers, prev, 512)
    bits = 8 * len(codec.encode_delta(layers, prev, 512)) / count
    assert 0.05 < codec.changed_fraction(layers, prev) < 0.1  # redraws can hit the old value
    assert bound <= bits < bound + 0.05, (bits, bound)
    assert bits < 0.3 * 8 * codec.fixed_nbytes(RESNET18, 512) / count  # the target
