"""cuDNN's autotuner and TF32 are device-policy decisions (issue 25), set by
``DevicePolicy.apply`` and recorded in ``env.json``, not side effects of seeding; the
non-finite-loss limit is counted in steps, on the device, with no host sync."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.core.device_policy import DevicePolicy, backend_flags, set_tf32
from benchmarks.core.protocols import resolve_protocol
from benchmarks.core.seeding import set_deterministic
from benchmarks.engine import training
from benchmarks.engine.loss_monitor import LossMonitor, LossReading
from benchmarks.engine.training import MAX_NONFINITE_STEPS, Trainer, TrainingDivergedError
from benchmarks.perf.opcount import OpCounter
from tests.engine.test_fp16_momentum import _Plain

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture
def saved_flags():
    """Put the process's cuDNN and TF32 flags back after a test."""
    before = backend_flags()
    yield
    torch.backends.cudnn.benchmark = before["cudnn_benchmark"]
    torch.backends.cudnn.deterministic = before["cudnn_deterministic"]
    set_tf32(before["tf32_matmul"])  # both back to one value; conv's own below
    space = torch.backends.cudnn
    if hasattr(getattr(space, "conv", None), "fp32_precision"):
        space.conv.fp32_precision = "tf32" if before["tf32_conv"] else "ieee"
    else:
        space.allow_tf32 = before["tf32_conv"]


@pytest.mark.parametrize("device, amp, deterministic, autotune, tf32", [
    (CUDA, "none", False, True, False),  # paper numerics: IEEE fp32 convolutions and matmuls
    (CUDA, "bf16", False, True, True),
    (CUDA, "fp16", True, False, True),  # --deterministic: no autotuner
    (CPU, "none", False, False, False),
    (CPU, "bf16", False, False, False),  # nothing of it applies off the GPU
])
def test_the_policy_decides_cudnn_benchmark_and_tf32(device, amp, deterministic, autotune,
                                                     tf32):
    policy = DevicePolicy.for_device(device, amp=amp, deterministic=deterministic)
    assert (policy.cudnn_benchmark, policy.tf32) == (autotune, tf32)


def test_apply_sets_the_flags_and_seeding_leaves_them(saved_flags):
    policy = DevicePolicy.for_device(CUDA, amp="none")
    set_tf32(True)
    policy.apply()
    flags = backend_flags()
    assert flags["cudnn_benchmark"] is True
    assert (flags["tf32_conv"], flags["tf32_matmul"]) == (False, False)
    set_deterministic(True)  # was: cudnn.benchmark = not enabled, a seeding side effect
    try:
        assert backend_flags()["cudnn_benchmark"] is True
    finally:
        set_deterministic(False)
    DevicePolicy.for_device(CUDA, amp="bf16", deterministic=True).apply()
    flags = backend_flags()
    assert (flags["cudnn_benchmark"], flags["tf32_conv"], flags["tf32_matmul"]) == (
        False, True, True)
    described = DevicePolicy.for_device(CUDA, amp="bf16").describe()
    assert described["tf32"] is True and described["backend_flags"] == backend_flags()


def _trainer(monkeypatch, scaling: bool) -> Trainer:
    monkeypatch.setattr(training, "loss_scaling", lambda device, amp: scaling)
    torch.manual_seed(0)
    protocol = resolve_protocol("smoke", "synthetic").with_overrides(
        amp="fp16" if scaling else "none")
    return Trainer(nn.Linear(3, 2), _Plain(), protocol, CPU)


def test_non_finite_steps_are_counted_every_step_without_a_sync(monkeypatch):
    trainer = _trainer(monkeypatch, scaling=True)
    y = torch.zeros(4, dtype=torch.long)
    good, bad = torch.randn(4, 3), torch.full((4, 3), float("nan"))
    with OpCounter() as ops:
        for x in [bad] * 3 + [good] + [bad] * 5 + [good]:
            trainer.step(x, y)
    assert ops.syncs == 0
    assert int(trainer.nonfinite_streak) == 0 and int(trainer.nonfinite_peak) == 5
    for x in [bad] * 2:
        trainer.step(x, y)
    assert int(trainer.nonfinite_streak) == 2 and int(trainer.nonfinite_peak) == 5


def test_the_limit_is_in_steps_read_with_the_loss(monkeypatch):
    """21 non-finite steps in a row stop an fp16 run at the next reading (was: 21 readings
    every 10 steps, ~210 steps); 20 do not. Without loss scaling one is divergence."""
    trainer = _trainer(monkeypatch, scaling=True)
    monitor = LossMonitor(CPU, every=10)
    y = torch.zeros(4, dtype=torch.long)
    bad = torch.full((4, 3), float("nan"))
    readings = []
    last = MAX_NONFINITE_STEPS + 1
    for step in range(1, last + 1):
        loss = trainer.step(bad, y)
        reading = monitor.offer(step, loss, loss, report=step == last,  # as fit's epoch end
                                nonfinite=trainer.nonfinite_peak)
        readings += [reading] if reading else []
    readings.append(monitor.settle())
    assert [(r.step, r.nonfinite) for r in readings] == [(10, 10), (20, 20), (21, 21)]
    trainer.check_finite(readings[1])  # 20 in a row: still skipped steps
    with pytest.raises(TrainingDivergedError, match="21 non-finite step"):
        trainer.check_finite(readings[2])
    plain = _trainer(monkeypatch, scaling=False)
    plain.check_finite(LossReading(10, 1.0, 1.0, 0))
    with pytest.raises(TrainingDivergedError, match="1 non-finite step"):
        plain.check_finite(LossReading(10, 1.0, 1.0, 1))  # a non-finite step between reads


def test_auto_stays_on_the_cpu_in_the_suite_where_a_gpu_is_visible(monkeypatch):
    """The suite's CPU tests (conftest: ``$NWS_DEVICE=cpu``) resolve ``--device auto`` to the
    CPU on a machine with a GPU; without the variable auto takes the GPU."""
    from benchmarks.core.device_policy import DEVICE_ENV, resolve_device
    from benchmarks.exec.run import parser

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert parser().parse_args([]).device == "auto"  # the CLI's default
    assert resolve_device("auto") == CPU
    monkeypatch.delenv(DEVICE_ENV)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setenv(DEVICE_ENV, "gpu0")
    with pytest.raises(ValueError, match=r"'gpu0' \(from \$NWS_DEVICE\) is not a device"):
        resolve_device("auto")



@pytest.mark.parametrize("compile, forced, env, path", [
    (False, None, None, "certificates"),  # the CPU default
    (True, None, None, "full"),  # compiled: the search traced whole with the step
    (True, "certificates", None, "certificates"),  # --search forces either
    (True, None, "certificates", "certificates"),  # so does $NWS_SEARCH
    (False, "full", None, "full"),
])
def test_a_compiled_cpu_step_takes_the_full_search_unless_one_is_forced(
        compile, forced, env, path, monkeypatch):
    monkeypatch.delenv("NWS_SEARCH", raising=False)
    if env:
        monkeypatch.setenv("NWS_SEARCH", env)
    assert DevicePolicy.for_device(CPU, search=forced, compile=compile).search == path
    assert DevicePolicy.for_device(CUDA, search=forced, compile=compile).search == (
        forced or env or "full")
