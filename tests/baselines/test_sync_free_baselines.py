"""The baselines' batched step (issue 13): the same values as the per-layer code it replaces,
no host sync per steady-state step, and few ops per step (counted by ``OpCounter`` on CPU,
the CUDA code path; counts do not depend on batch or image size, so small inputs are used).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from baselines.aqd import EPS, RECIPES, QuantBank, QuantConv, grad_scale
from baselines.ksm import KernelMaskedConv, MultiplierBank
from benchmarks.methods.common import ste
from benchmarks.perf.profile import profile_method


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


def test_ksm_bank_equals_each_layers_multiplier():
    convs = [torch.nn.Conv2d(8, 6, 3, bias=False), torch.nn.Conv2d(6, 4, 1, bias=False),
             torch.nn.Conv2d(4, 4, 3, bias=False)]
    layers = [KernelMaskedConv(c, 1e-2, 5e-3, 1200, 100, 0.5) for c in convs]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers[:2]:  # soft and hard kernels mixed; the last layer all hard
            layer.mask.copy_(torch.rand(layer.mask.shape, generator=g) * 0.02 - 0.01)
    bank = MultiplierBank(layers)
    for training in (True, False):
        for layer in layers:
            layer.train(training)
        own = [layer.multiplier() for layer in layers]
        batched = bank.multipliers(training)
        for a, b in zip(own, batched, strict=True):
            assert torch.equal(a[:, :, None, None], b)  # bit for bit
    own = [layer.train().multiplier() for layer in layers]  # trains through the surrogate
    weights = [torch.randn(m.shape) for m in own]
    sum((w * s).sum() for w, s in zip(weights, own, strict=True)).backward()
    reference = _grads([m.mask for m in layers])
    for m in layers:
        m.mask.grad = None
    sum((w * s[:, :, 0, 0]).sum() for w, s in
        zip(weights, bank.multipliers(True), strict=True)).backward()
    for ref, got in zip(reference, _grads([m.mask for m in layers]), strict=True):
        assert ref.abs().sum() > 0
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def _aqd_reference(layer: QuantConv, x: torch.Tensor) -> torch.Tensor:
    """The per-layer AQD forward in plain autograd, written from each recipe's rule.

    ``lsq``: LSQ on the step s = max(alpha, EPS) / Q (gradient scaled by 1/sqrt(N Q)), levels
    round(x * (1/s)) clamped to 0..Q, a straight-through gradient where the rounded level
    lies in 0..Q; the layer's own weight path. ``qtool`` (QTool's op order, models/quant.py
    lines 473-479 and 535-548): y = clamp(x / |alpha|, 0, 1), round(y Q) / Q
    straight-through, times |alpha|; weights standardised by their detached mean and
    unbiased std, then clamp(w / |alpha_w|, -1, 1) -> (y + 1) / 2 -> round(y Q) / Q
    -> 2 y - 1 -> times |alpha_w|; factor 1 on every scale."""
    x = x.float()
    if layer.recipe.name == "lsq":
        s = grad_scale(layer.alpha_a.float().clamp_min(EPS) / layer.qa,
                       1 / math.sqrt(x[0].numel() * layer.qa))
        level = torch.round(x.detach() * (1 / s.detach()))
        inside = ((level >= 0) & (level <= layer.qa)).float()
        xq = ste(level.clamp(0, layer.qa), x / s * inside) * s
        return F.conv2d(xq, layer.quantized_weight(), None, layer.stride, layer.padding)
    q = layer.qa
    a = layer.alpha_a.float().abs().clamp_min(EPS)
    y = (x / a).clamp(0, 1)
    xq = ste(torch.round(y * q), y * q) / q * a
    w = layer.weight.float()
    std, mean = torch.std_mean(w.detach())
    aw = layer.alpha_w.float().abs().clamp_min(EPS)
    y = ((w - mean) / std / aw).clamp(-1, 1)
    y = (y + 1) / 2
    wq = (ste(torch.round(y * layer.qw), y * layer.qw) / layer.qw * 2 - 1) * aw
    return F.conv2d(xq, wq, None, layer.stride, layer.padding)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_aqd_bank_equals_the_per_layer_quantiser(recipe):
    torch.manual_seed(0)
    layers = [QuantConv(torch.nn.Conv2d(4, 6, 3, bias=False), 2, 2, RECIPES[recipe]),
              QuantConv(torch.nn.Conv2d(6, 5, 1, bias=False), 2, 2, RECIPES[recipe])]
    for layer, scale in zip(layers, (1.3, 0.7), strict=True):
        layer.act_initialised = True
        layer.alpha_a.data.fill_(scale)
    if recipe == "lsq":
        layers[1].alpha_w.data[0] = -1.0  # a scale below EPS: clamped, passes no gradient
    else:
        layers[1].alpha_w.data.fill_(-0.8)  # QTool uses |alpha|: gradient of sign -1
    bank = QuantBank(layers)
    x = torch.randn(2, 4, 5, 5).relu() * 2
    params = [p for m in layers for p in m.parameters()]

    def run(batched: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for p in params:
            p.grad = None
        if batched:
            bank(None, ())
        layer = (lambda m, h: m(h)) if batched else _aqd_reference
        # softplus, not relu: the recipes' op orders differ in the last bit, and at relu's
        # kink a last-bit difference (0 against 1e-7) switches a gradient on or off
        out = layer(layers[1], F.softplus(layer(layers[0], x)))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), _grads(params)

    ref_out, ref_grads = run(False)
    out, grads = run(True)
    if recipe == "lsq":
        assert torch.equal(out, ref_out)  # forward values bit for bit
        assert float(grads[4][0]) == 0  # alpha_w clamped at EPS
    else:  # QTool's op order rounds differently in the last bit
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for ref, got in zip(ref_grads, grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def plain_ops() -> int:
    return profile_method("finetune", batch=4, size=16).ops


# Upper bounds (x the plain step's aten ops) on ResNet-18, batch 32, 32x32 (plain 297):
# PackNet 299 (1.01x), KSM 490 (1.65x), AQD 635 (2.14x, issue 22: QTool's recipe, the
# default; 579 = 1.95x with recipe=lsq, 577 before issue 22). AQD's 19 layers quantise their
# own inputs in PyTorch's fake-quant op (issue 17: 692 with the earlier 11-op quantiser);
# QTool's band (the input gradient passes for 0 <= x <= alpha, not where the rounded level
# is in 0..Q) is what the kernel's mask does not give: one clamp to [0, alpha] and one
# compare per layer (+38), with the layer's scale as one view each (+19), and the weight
# standardisation once per step (+12); its factor-1 scale gradient saves one multiply per
# layer (-19). Hence 2.2 for AQD. Before issue 13: 499, 1033, 2215.
@pytest.mark.parametrize(("method", "bound"), [("packnet", 1.1), ("ksm", 2.0), ("aqd", 2.2)])
def test_steady_state_step_is_sync_free_and_batched(method, bound, plain_ops):
    counted = profile_method(method, batch=4, size=16)
    assert counted.syncs == 0, counted.sync_ops
    assert counted.ops <= bound * plain_ops, (counted.ops, plain_ops)
