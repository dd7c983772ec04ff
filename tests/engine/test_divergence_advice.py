"""The divergence error's advice fits the run: no mixed-precision advice where AMP is off."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from benchmarks.core.protocols import resolve_protocol
from benchmarks.engine.loss_monitor import LossReading
from benchmarks.engine.training import MAX_NONFINITE_STEPS, Trainer, TrainingDivergedError


def _diverge(device: str, amp: str, scaler_on: bool = False) -> str:
    protocol = resolve_protocol("paper", "cub_to_sketches").with_overrides(amp=amp)
    trainer = SimpleNamespace(protocol=protocol, device=torch.device(device),
                              scaler=SimpleNamespace(is_enabled=lambda: scaler_on))
    with pytest.raises(TrainingDivergedError) as err:
        Trainer.check_finite(trainer, LossReading(7, float("nan"), 1.0,
                                                  MAX_NONFINITE_STEPS + 1 if scaler_on else 1))
    return str(err.value)


@pytest.mark.parametrize("amp", ["fp16", "bf16", "none"])
def test_on_cpu_amp_is_off_so_the_advice_is_lr_and_data(amp):
    msg = _diverge("cpu", amp)
    assert "(amp=none," in msg and "--set amp" not in msg
    assert "lower the learning rate" in msg and "check the data" in msg


def test_cuda_advice_follows_the_precision_in_use():
    fp16 = _diverge("cuda", "fp16", scaler_on=True)
    assert "amp=fp16" in fp16 and "--set amp=bf16" in fp16
    bf16 = _diverge("cuda", "bf16")
    assert "amp=bf16" in bf16 and "--set amp=none" in bf16 and "amp=bf16 (" not in bf16
    off = _diverge("cuda", "none")
    assert "--set amp" not in off and "check the data" in off
