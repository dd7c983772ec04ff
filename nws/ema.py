"""Pool learning during pretraining: the EMA rule of the authors' code (VQ-VAE codebook).

Per layer, with assignments a(i) of the rows w_i of W to pool entries:
    N_j <- decay N_j + (1 - decay) |{i: a(i) = j}|
    S_j <- decay S_j + (1 - decay) sum_{a(i) = j} w_i
    m_j <- S_j / ((N_j + eps) / (sum N + n eps) x sum N)      (Laplace-smoothed sizes)
with N = 0 and S = M at the start (the authors' initialisation: M ~ N(0, 1)). Call
:func:`ema_update` once per optimiser step, after the backward and before ``step()``, so the
assignments are those of the forward pass the step used.
"""

from __future__ import annotations

import torch
from torch import nn

from nws.convert import nws_layers
from nws.layer import NWSLayer

DECAY = 0.99  # authors' code
EPS = 1e-5  # authors' code


def enable_ema(model: nn.Module) -> None:
    """Give every NWS layer its EMA state (cluster sizes 0, sums = current pool)."""
    for layer in nws_layers(model).values():
        if not hasattr(layer, "ema_size"):
            layer.register_buffer("ema_size", torch.zeros(layer.pool_size,
                                                          device=layer.pool.device))
            layer.register_buffer("ema_sum", layer.pool.detach().clone())


@torch.no_grad()
def ema_update_layer(layer: NWSLayer, decay: float = DECAY, eps: float = EPS,
                     apply: torch.Tensor | None = None) -> None:
    """``apply``: a 0-d bool tensor; where False the layer's EMA state and pool are left as
    they are (a skipped step), decided on the device without a host sync."""
    index = layer.last_index()  # the assignments of this step's forward
    rows = layer.rows().detach().float()
    # index_add_, not bincount: bincount's output size depends on the data (a host sync)
    counts = rows.new_zeros(layer.pool_size).index_add_(0, index, rows.new_ones(len(index)))
    sums = torch.zeros_like(layer.ema_sum).index_add_(0, index, rows)
    size = layer.ema_size.mul(decay).add_(counts, alpha=1 - decay)
    total_sum = layer.ema_sum.mul(decay).add_(sums, alpha=1 - decay)
    total = size.sum()
    smoothed = (size + eps) / (total + layer.pool_size * eps) * total
    pool = total_sum / smoothed[:, None]
    if apply is not None:
        size, total_sum = (torch.where(apply, size, layer.ema_size),
                           torch.where(apply, total_sum, layer.ema_sum))
        pool = torch.where(apply, pool, layer.pool)
    layer.ema_size.copy_(size)
    layer.ema_sum.copy_(total_sum)
    layer.pool.copy_(pool)


def ema_update(model: nn.Module, decay: float = DECAY, eps: float = EPS) -> None:
    """One EMA step for every NWS layer (see the module docstring)."""
    for layer in nws_layers(model).values():
        ema_update_layer(layer, decay, eps)
