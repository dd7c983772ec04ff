"""The loss is read back without a device wait inside an epoch, and divergence is still
caught by the training loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.core.protocols import resolve_protocol
from benchmarks.data import BENCHMARKS
from benchmarks.engine.loss_monitor import LossMonitor
from benchmarks.engine.training import PhaseSpec, TrainingDivergedError, fit
from benchmarks.perf.opcount import OpCounter
from tests.data.test_batches import _Plain

CPU = torch.device("cpu")


def test_readings_arrive_one_step_after_each_report_step_with_their_values():
    monitor = LossMonitor(CPU, every=10)
    seen, running = [], torch.tensor(0.0)
    with OpCounter() as ops:
        for step in range(1, 26):
            loss = torch.tensor(float(step))
            running = 0.9 * running + 0.1 * loss
            reading = monitor.offer(step, loss, running)
            if reading is not None:
                seen.append(reading)
    assert ops.syncs == 0  # no .item() / float() of a device value inside the loop
    assert [r.step for r in seen] == [10, 20]
    assert seen[0].loss == 10.0 and seen[1].loss == 20.0
    assert seen[1].running == pytest.approx(float(_running_at(20)), rel=1e-6)
    last = monitor.offer(30, torch.tensor(30.0), torch.tensor(3.0))
    assert last is None  # the copy of step 30 is in flight until settled
    settled = monitor.settle()
    assert settled is not None and (settled.step, settled.loss, settled.running) == (30, 30, 3)
    assert monitor.settle() is None
    # an epoch's last step forces a copy, also while another is in flight
    monitor.offer(40, torch.tensor(40.0), torch.tensor(4.0))
    earlier = monitor.offer(41, torch.tensor(41.0), torch.tensor(4.1), report=True)
    assert earlier is not None and earlier.step == 40
    assert monitor.settle().step == 41


def _running_at(step: int) -> torch.Tensor:
    running = torch.tensor(0.0)
    for s in range(1, step + 1):
        running = 0.9 * running + 0.1 * torch.tensor(float(s))
    return running


def test_fit_still_stops_on_a_diverging_loss():
    bench = BENCHMARKS.get("split_digits")(None, size=16)
    proto = resolve_protocol("quick", "split_digits").with_overrides(epochs=1, lr=1e30)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 14 * 14, 2))
    with pytest.raises(TrainingDivergedError, match=r"loss is (nan|inf)"):
        fit(model, _Plain(), proto, bench.tasks[0].train,
            PhaseSpec(device=CPU, seed=0, task=0, phase="train", progress=False))


def test_the_cuda_event_marks_the_stream_of_the_loss_device(monkeypatch):
    """The CUDA branch (pinned buffer, event), emulated: the event is recorded on the stream
    of the device that holds the loss (the copy's stream), not on the current device's."""
    recorded, real_empty = [], torch.empty

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

        def query(self) -> bool:
            return True

        def synchronize(self) -> None:
            pass

    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: real_empty(*a, **k))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream", device))
    monitor = LossMonitor(torch.device("cuda", 1), every=1)
    assert monitor.offer(1, torch.tensor(2.0), torch.tensor(3.0)) is None
    assert recorded == [("stream", CPU)]  # the loss's device (CPU here), passed explicitly
    reading = monitor.offer(2, torch.tensor(4.0), torch.tensor(5.0))
    assert (reading.step, reading.loss, reading.running) == (1, 2.0, 3.0)
