"""Host batches are pinned when the policy's device is CUDA, never for a CPU run (was:
whenever CUDA was visible, so a ``--device cpu`` run on a GPU machine pinned every batch)."""

from __future__ import annotations

import torch

from benchmarks.core.device_policy import DevicePolicy
from benchmarks.core.protocols import resolve_protocol
from benchmarks.data import BENCHMARKS
from benchmarks.engine import training


def test_the_policy_alone_decides_pinning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU is visible
    cpu, cuda = DevicePolicy.for_device("cpu"), DevicePolicy.for_device(torch.device("cuda"))
    assert not cpu.pin_memory and cuda.pin_memory
    data = BENCHMARKS.get("split_digits")(None, size=16).tasks[0].train
    proto = resolve_protocol("smoke", "split_digits")
    batches = training._epoch_batches(data, None, proto, 0, (0, "train", 0), 0,
                                      cpu.pin_memory)
    assert batches._pin_memory is False  # the DataLoader iterator of a CPU run
    x, _ = next(batches)
    assert not x.is_pinned()
