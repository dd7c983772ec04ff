"""fp16 loss scaling cannot corrupt momentum (issue 25): PyTorch's fused SGD creates its
first step's momentum buffers with ``empty_like`` and a skipped (non-finite) step leaves them
unwritten; the Trainer zeroes them up front. Forced on CPU: fused SGD and ``GradScaler("cpu")``
run the same Python path as on CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from benchmarks.core.protocols import resolve_protocol
from benchmarks.engine import training
from benchmarks.engine.training import Trainer, zero_momentum_buffers


class _Plain:
    """The least of a Method that Trainer needs: plain training of every parameter."""

    optimizer_weight_decay = True

    def parameters(self, model: nn.Module):
        return model.parameters()

    def extra_loss(self, model: nn.Module) -> None:
        return None

    def after_backward(self, model: nn.Module) -> None:
        pass

    def after_step(self, model: nn.Module) -> None:
        pass


def _fp16_trainer(monkeypatch) -> Trainer:
    """The Trainer's own optimiser construction with loss scaling on, on the CPU."""
    monkeypatch.setattr(training, "loss_scaling", lambda device, amp: amp == "fp16")
    torch.manual_seed(0)
    protocol = resolve_protocol("smoke", "synthetic").with_overrides(amp="fp16")
    trainer = Trainer(nn.Linear(6, 4), _Plain(), protocol, torch.device("cpu"))
    assert trainer.scaler.is_enabled() and trainer.opt.defaults["fused"]
    return trainer


def test_a_skipped_first_fused_step_leaves_pytorchs_first_step(monkeypatch):
    _garbage_empty_like(monkeypatch)  # any buffer PyTorch made and left unwritten shows
    trainer = _fp16_trainer(monkeypatch)
    protocol, model = trainer.protocol, trainer.model
    start = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
    bad = x.clone()
    bad[0, 0] = float("inf")

    loss = trainer.step(bad, y)  # non-finite: the scaler skips the step
    assert not torch.isfinite(loss)
    assert trainer.scaler.get_scale() == 2.0 ** 15  # halved from 65536: the step was skipped
    for p, p0 in zip(model.parameters(), start.parameters(), strict=True):
        assert torch.equal(p, p0)
        assert torch.equal(trainer.opt.state[p]["momentum_buffer"], torch.zeros_like(p))
    trainer.step(x, y)  # the first step that counts

    # PyTorch's own first SGD step (buf = grad), written out: d = g + wd * p; buf = d;
    # nesterov: p -= lr * (d + m * buf), else p -= lr * buf
    nn.functional.cross_entropy(start(x), y).backward()
    lr, m, wd = protocol.lr, protocol.momentum, protocol.weight_decay
    for p, p0 in zip(model.parameters(), start.parameters(), strict=True):
        d = p0.grad + wd * p0.detach()
        step = d + m * d if protocol.nesterov else d
        torch.testing.assert_close(p.detach(), p0.detach() - lr * step, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(trainer.opt.state[p]["momentum_buffer"], d,
                                   rtol=1e-6, atol=1e-7)


def _garbage_empty_like(monkeypatch) -> None:
    """``torch.empty_like`` returns memory holding 1e30 (what uninitialised memory may hold),
    so that a buffer PyTorch creates and never writes is seen deterministically."""
    monkeypatch.setattr(torch, "empty_like",
                        lambda t, **kw: torch.full_like(t, 1e30, **kw))


def test_the_unzeroed_fused_step_is_what_it_guards_against(monkeypatch):
    """Without the zeroed buffers, the skipped first step leaves empty_like's memory as
    momentum and the next step moves the weights by ~lr * 0.9 * 1e30."""
    monkeypatch.setattr(training, "zero_momentum_buffers", lambda opt: None)
    _garbage_empty_like(monkeypatch)
    trainer = _fp16_trainer(monkeypatch)
    y = torch.zeros(8, dtype=torch.long)
    trainer.step(torch.full((8, 6), float("inf")), y)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.step(torch.randn(8, 6), y)
    moved = max((p - b).abs().max().item()
                for p, b in zip(trainer.model.parameters(), before, strict=True))
    assert moved > 1e25


def test_zeroed_buffers_refuse_dampening():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9, dampening=0.1)
    with pytest.raises(ValueError, match="dampening"):
        zero_momentum_buffers(opt)
    adam = torch.optim.Adam(nn.Linear(2, 2).parameters())
    zero_momentum_buffers(adam)  # no momentum buffers to make
    assert not adam.state
