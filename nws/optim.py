"""Optimiser state that a skipped first step cannot leave uninitialised."""

from __future__ import annotations

import torch


def zero_momentum_buffers(opt: torch.optim.Optimizer) -> None:
    """Give every parameter of an SGD optimiser with momentum a zeroed momentum buffer now.

    Why: PyTorch's fused SGD (``torch/optim/sgd.py``, ``_fused_sgd``) creates the buffers of
    its first step with ``torch.empty_like`` and lets its kernel fill them (``buf = grad``);
    under a GradScaler whose first step is non-finite the kernel returns without writing, so
    the next step reads uninitialised memory as momentum (weights moved by 1e16-1e30 on CPU).
    With zeroed buffers every step is a regular one, ``buf = momentum * buf + (1 -
    dampening) * grad``, which from ``buf = 0`` and dampening 0 is ``buf = grad``: PyTorch's
    first step exactly. A skipped step leaves the zeros. ``ValueError`` for dampening != 0
    (the first steps would differ); optimisers without momentum are left alone."""
    if not isinstance(opt, torch.optim.SGD):
        return
    for group in opt.param_groups:
        if group["momentum"] == 0:
            continue
        if group["dampening"] != 0:
            raise ValueError("zeroed momentum buffers equal PyTorch's first SGD step only "
                             f"with dampening 0 (got {group['dampening']})")
        for p in group["params"]:
            opt.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
