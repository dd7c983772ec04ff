"""Vectorised bit packing equals the per-bit definition; stored models rebuild without a
random init, and a rebuild that leaves a tensor unset is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.models import archs
from nws import bitpack


def _per_bit_pack(values: np.ndarray, bits: int) -> bytes:
    """The definition: value i's bit b is stream bit i * bits + b (little-endian bits)."""
    v = np.asarray(values).astype(np.uint64)
    matrix = ((v[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(matrix.ravel(), bitorder="little").tobytes()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 24, 25, 31, 33, 57, 58, 63])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 1001])
def test_pack_and_unpack_follow_the_per_bit_definition(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    values = rng.integers(0, 1 << min(bits, 62), count)
    if count:
        values[0] = (1 << min(bits, 62)) - 1  # the widest value
    data = bitpack.pack(values, bits)
    assert data == _per_bit_pack(values, bits)
    assert len(data) == bitpack.packed_nbytes(count, bits)
    out = bitpack.unpack(data, bits, count)
    assert out.dtype == np.int64 and np.array_equal(out, values)


def test_unpack_refuses_too_few_bytes():
    with pytest.raises(ValueError, match="fewer than 9 values"):
        bitpack.unpack(bytes(5), 5, 9)


def test_no_init_builds_without_initialising_and_unset_tensors_show():
    with archs.no_init():
        model = archs.build("resnet18", 5)
    assert len(archs.unset_tensors(model)) == len(model.state_dict()) - sum(
        1 for k in model.state_dict() if k.endswith("num_batches_tracked"))
    model.load_state_dict(archs.build("resnet18", 5).state_dict())
    assert archs.unset_tensors(model) == []
    with torch.device("meta"), archs.no_init():  # shapes-only models stay on meta
        assert next(archs.build("resnet18").parameters()).is_meta


def test_a_rebuild_that_leaves_tensors_unset_is_refused(tmp_path):
    from benchmarks.engine.harness import rebuild

    class Forgetful:
        name = "forgetful"

        def load_task(self, task, store):
            model = archs.build("resnet18", 5)
            state = model.state_dict()
            state.pop("fc.bias")
            model.load_state_dict({k: torch.zeros_like(v) for k, v in state.items()},
                                  strict=False)
            return model

    with pytest.raises(RuntimeError, match=r"forgetful.load_task left 1 tensors unset.*fc.bias"):
        rebuild(Forgetful(), None, None)
