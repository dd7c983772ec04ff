"""``Trainer(..., compile=True)``: every registered method survives ``torch.compile`` of its
model (CPU, inductor), and two compiled steps give the losses of two eager steps.

A tiny two-conv network stands in for ResNet-18 (registered for these tests only): compile
time grows with the graph, and what is tested here (hooks, fused autograd ops, per-step
state of the methods under dynamo) does not depend on depth.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import nws
from benchmarks.core.device_policy import DevicePolicy, compile_mode
from benchmarks.core.registry import Entry
from benchmarks.engine.training import compile_model
from benchmarks.methods.table import METHODS
from benchmarks.models.archs import ARCHS, ArchSpec
from benchmarks.perf.profile import (
    build_method,
    build_trainer,
    count_compile,
    cuda_code_path,
    main,
    synthetic_batch,
)
from nws import nws_layers

TINY = "tiny-test-net"
TINY_NWS = {"pool_size": 16, "kmeans_points": 256}
# method variants tested beside the registered methods: name -> (method, options)
VARIANTS = {"aqd-lsq": ("aqd", {"recipe": "lsq"})}


def _method(name: str) -> tuple[str, dict | None]:
    """(registered method, options) of ``name``: a method or one of :data:`VARIANTS`."""
    return VARIANTS.get(name, (name, TINY_NWS if name == "nws" else None))


class TinyNet(nn.Module):
    """conv-BN-ReLU twice (the second strided), global pool, Linear head ``fc``."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def tiny_arch(monkeypatch) -> str:
    monkeypatch.setitem(ARCHS._entries, TINY,
                        Entry(TINY, ArchSpec(TINY, TinyNet, "fc", None), "tests only"))
    return TINY


def _losses(method: str, compile: bool, steps: int = 2) -> list[float]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        name, options = _method(method)
        trainer = build_trainer(build_method(name, TINY, options=options), Path(tmp),
                                compile=compile)
        x, y = synthetic_batch(4, 8, torch.device("cpu"))
        return [float(trainer.step(x, y)) for _ in range(steps)]


def test_compile_mode_is_decided_by_the_policy():
    assert compile_mode(torch.device("cpu")) == "default"
    assert compile_mode(torch.device("cuda")) == "reduce-overhead"  # CUDA graphs
    assert DevicePolicy.for_device("cpu").compile_mode is None  # off by default
    assert DevicePolicy.for_device("cpu", compile=True).compile_mode == "default"


def _check_compiled_equals_eager(method: str) -> None:
    torch._dynamo.reset()
    eager = _losses(method, compile=False)
    compiled = _losses(method, compile=True)
    assert all(torch.isfinite(torch.tensor(compiled)))
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_survives_compile(method, tiny_arch, monkeypatch):
    """Dynamo and AOT autograd (where a method's hooks, fused autograd ops and per-step
    state meet the compiler), without inductor's C++ builds (seconds per method: measured in
    docs/performance.md, The test suite and the tools' start-up)."""
    monkeypatch.setattr("benchmarks.engine.training.compile_options",
                        lambda device: {"backend": "aot_eager"})
    _check_compiled_equals_eager(method)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["aqd", "aqd-lsq"])
def test_inductor_compiles_a_method_step(method, tiny_arch):
    """The CPU default (inductor) end to end, on the method with the most custom ops, in
    both recipes (lsq: its activation-scale init in the graph; most of its time is C++
    builds: docs/performance.md, The test suite and the tools' start-up)."""
    _check_compiled_equals_eager(method)


@pytest.mark.parametrize("method", [
    "finetune", "packnet",
    pytest.param("ksm", marks=pytest.mark.slow),
    pytest.param("nws", marks=pytest.mark.slow),
    pytest.param("aqd", marks=pytest.mark.slow),
    pytest.param("aqd-lsq", marks=pytest.mark.slow),
])
def test_each_training_step_is_captured_whole(method, tiny_arch):
    """0 graph breaks, one graph and at most one recompile per batch shape (a full batch,
    then a short last one), counted by dynamo with the eager backend. ``aqd-lsq``: the
    recipe whose activation scales start from the first batch (no recompile after it)."""
    name, options = _method(method)
    counts = count_compile(name, arch=tiny_arch, batch=4, size=8, options=options)
    assert counts.whole, counts


def test_profile_reports_graphs_breaks_and_recompiles(tiny_arch, capsys):
    assert main(["--compile-counts", "--method", "finetune", "--arch", tiny_arch,
                 "--batch", "4", "--size", "8", "--warmup", "1"]) == 0
    row = capsys.readouterr().out.splitlines()[2].split()
    assert row[:5] == ["finetune", "2", "0", "1", "yes"]  # graphs: batch 4 and 3


def _run_steps(method: str, compiled: bool, steps: int = 4) -> dict[str, list[torch.Tensor]]:
    """Logits, losses, the model's state after the last step and NWS's indices of each step,
    on the CUDA code path (NWS: the full search), eager or compiled with the eager backend
    (the graph dynamo captures, run op for op: equal values down to the bit). Step 2 is a
    short batch, every step a new batch."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    out: dict[str, list[torch.Tensor]] = {"logits": [], "loss": [], "index": []}
    with cuda_code_path("full"), tempfile.TemporaryDirectory() as tmp:
        name, options = _method(method)
        trainer = build_trainer(build_method(name, TINY, options=options), Path(tmp))
        forward = compile_model(trainer.model, backend="eager") if compiled else trainer.model

        def recorded(x: torch.Tensor) -> torch.Tensor:
            logits = forward(x)
            out["logits"].append(logits.detach().clone())
            return logits

        trainer.forward = recorded
        for i in range(steps):
            x, y = synthetic_batch(4 - (i == 2), 8, torch.device("cpu"), seed=i)
            out["loss"].append(trainer.step(x, y).clone())
            out["index"] += [layer.last_index().clone()
                             for layer in nws_layers(trainer.model).values()]
        out["state"] = [v.detach().clone() for v in trainer.model.state_dict().values()
                        if isinstance(v, torch.Tensor)]  # not AQD's extra state (flags)
    torch._dynamo.reset()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nws", "ksm", "aqd", "aqd-lsq"])
def test_captured_step_equals_eager(method, tiny_arch):
    """The whole-step capture (NWS's pure search in the graph, KSM's and AQD's banks traced
    with the forward, AQD's fake-quant as plain ops and, ``aqd-lsq``, its first-batch init of
    the activation scales traced every step) changes no value: logits, losses,
    updated weights and buffers, and NWS's indices of every step equal the eager step's
    exactly."""
    eager, compiled = _run_steps(method, False), _run_steps(method, True)
    for name, values in eager.items():
        assert len(values) == len(compiled[name]) > 0 or name == "index"
        for a, b in zip(values, compiled[name], strict=True):
            assert torch.equal(a, b), name
    if method == "nws":
        assert len(eager["index"]) == 4 * 3  # conv1, conv2, the head, every step


def test_compiled_search_product_is_ieee_whatever_the_tf32_flags(monkeypatch):
    """A graph cannot set the matmul precision flags the eager search sets around its product
    (policy: TF32 on under CUDA AMP); inside one the product is an opaque op that sets them
    itself: IEEE while it runs, the user's TF32 setting back after, values as eager."""
    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    seen, real = [], torch.addmm

    def spy(*args, **kwargs):
        seen.append(m.fp32_precision)
        return real(*args, **kwargs)

    torch.manual_seed(0)
    layer = nws.NWSConv2d(nn.Conv2d(3, 4, 3, bias=False), torch.randn(16, 9) * 0.2,
                          search="full")
    x = torch.randn(2, 3, 6, 6)
    saved = m.fp32_precision
    try:
        m.fp32_precision = "tf32"
        monkeypatch.setattr(torch, "addmm", spy)
        torch._dynamo.reset()
        out = torch.compile(layer, backend="eager")(x)
        assert m.fp32_precision == "tf32"
    finally:
        m.fp32_precision = saved
        torch._dynamo.reset()
    assert seen == ["ieee"]  # the one product, in IEEE
    assert torch.equal(out, layer(x))
