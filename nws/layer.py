"""NWS layers: temporary kernels W, a frozen layer-wise pool M, and the selected kernels K.

Forward (paper §4.1): every group of W (``group_size`` consecutive k x k kernels in
out-major, then in-channel order; a group may span output channels) is replaced by its
nearest pool entry (Eq. 1); the convolution runs with K; the gradient reaches W unchanged
(straight-through: out = f(W + sg(K - W))). The search is incremental (see
:mod:`nws.search`) and is redone only when W or the pool changed since the last one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nws.search import Searcher, searcher_for


class _StraightThrough(torch.autograd.Function):
    """Forward returns the selected kernels; backward hands the gradient to W unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        return selected

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _Similarity(torch.autograd.Function):
    """mean((W - sg(K))^2) with a lean backward: one fused pass, 2 (W - K) / numel."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, selected)
        return torch.linalg.vector_norm(weight - selected).square() / weight.numel()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight, selected = ctx.saved_tensors
        return torch.sub(weight, selected).mul_(grad * (2.0 / weight.numel())), None


class NWSLayer(nn.Module):
    """Base of :class:`NWSConv2d` and :class:`NWSLinear`; subclasses define ``_op``."""

    def __init__(self, weight: torch.Tensor, pool: torch.Tensor, group_size: int = 1,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        kernel = int(weight[0, 0].numel()) if weight.ndim > 2 else 1
        dim = group_size * kernel
        if weight.numel() % dim:
            raise ValueError(f"group size {group_size} does not divide the "
                             f"{weight.numel() // kernel} kernels of a {tuple(weight.shape)} "
                             "weight")
        if pool.ndim != 2 or pool.shape[1] != dim:
            raise ValueError(f"pool must be (n, {dim}) for this layer, got {tuple(pool.shape)}")
        self.group_size = group_size
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("pool", pool.detach().clone().float())
        self._searcher: Searcher | None = None
        self._selected: torch.Tensor | None = None
        self._key: tuple | None = None

    # -- shapes ----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Floats per group (pool entry length)."""
        return int(self.pool.shape[1])

    @property
    def pool_size(self) -> int:
        return int(self.pool.shape[0])

    @property
    def num_groups(self) -> int:
        """Indices this layer stores per task."""
        return self.weight.numel() // self.dim

    def rows(self) -> torch.Tensor:
        """W as (num_groups, dim): out-major, then input channel."""
        return self.weight.reshape(-1, self.dim)

    # -- search ----------------------------------------------------------------------------
    def _state_key(self) -> tuple:
        w = self.weight
        return (w._version, w.data_ptr(), w.device, self._pool_key())

    def _pool_key(self) -> tuple:
        p = self.pool
        return (p._version, p.data_ptr(), p.device)

    def reset_search(self) -> None:
        """Forget the cached search (done automatically when W or the pool changes)."""
        self._searcher = self._selected = self._key = None

    @torch.no_grad()
    def search(self, hint: torch.Tensor | None = None) -> torch.Tensor:
        """Indices of the selected pool entries (exact; recomputed only where needed).

        ``hint``: indices W is believed to be a lookup of (see :meth:`start_from`)."""
        self._refresh(hint)
        return self._searcher.index

    def _refresh(self, hint: torch.Tensor | None = None) -> None:
        """Bring the search and K up to date with W and the pool."""
        key = self._state_key()
        if self._key == key:
            return
        if self._key is None or self._key[3] != key[3]:  # new pool: start afresh
            self._searcher = searcher_for(self.pool.detach(), self.num_groups)
            self._selected = None
        changed = self._searcher.update(self.rows(), hint=hint)
        if self._selected is None or changed is None:  # None: every row was looked up
            self._selected = self._searcher.kernels()
        elif changed.numel():
            self._selected.index_copy_(0, changed, self._searcher.kernels(changed))
        self._key = key

    @torch.no_grad()
    def start_from(self, index: torch.Tensor) -> None:
        """W <- lookup(index) (Algorithm 1, line 3), with the search certified from the pool's
        gaps instead of recomputed."""
        self.weight.copy_(self.pool[index.to(self.pool.device).long()].view_as(self.weight))
        self.reset_search()
        self.search(hint=index)

    def selected(self) -> torch.Tensor:
        """K, shaped like W (no gradient; the pool is a lookup table)."""
        with torch.no_grad():
            self._refresh()
        return self._selected.view_as(self.weight)

    def indices(self) -> torch.Tensor:
        return self.search().clone()

    # -- losses ----------------------------------------------------------------------------
    def similarity(self) -> torch.Tensor:
        """mean((sg(K) - W)^2): pulls W towards its selected entries (Eq. 2, second term)."""
        return _Similarity.apply(self.weight, self.selected())

    def distillation(self) -> torch.Tensor:
        """mean((sg(W) - K)^2) with K differentiable w.r.t. the pool (Eq. 4, gradient rule)."""
        k = self.pool[self.search()].view_as(self.weight)
        return F.mse_loss(k, self.weight.detach())

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, _StraightThrough.apply(self.weight, self.selected()))

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_plain(self) -> nn.Module:
        """The plain module with the selected kernels (what inference runs)."""
        raise NotImplementedError

    @torch.no_grad()
    def _filled(self, plain: nn.Module) -> nn.Module:
        """``plain`` (same shape as this layer) with K as its weight and this layer's bias."""
        plain.weight.copy_(self.selected())
        if self.bias is not None:
            plain.bias.copy_(self.bias)
        return plain.to(self.weight.device)


class NWSConv2d(NWSLayer):
    """An NWS convolution (grouped and depthwise convolutions included)."""

    def __init__(self, conv: nn.Conv2d, pool: torch.Tensor, group_size: int = 1) -> None:
        if conv.padding_mode != "zeros":
            raise ValueError("NWSConv2d supports padding_mode='zeros' only")
        super().__init__(conv.weight, pool, group_size, conv.bias)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def to_plain(self) -> nn.Conv2d:
        out, _, kh, kw = self.weight.shape
        return self._filled(nn.Conv2d(self.in_channels, out, (kh, kw), self.stride,
                                      self.padding, self.dilation, self.groups,
                                      bias=self.bias is not None))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel={tuple(self.weight.shape[2:])}"
                f", groups={self.groups}, pool={tuple(self.pool.shape)}, gs={self.group_size}")


class NWSLinear(NWSLayer):
    """A Linear layer as a 1x1 convolution: every weight is a scalar kernel (paper §4.3)."""

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)

    def to_plain(self) -> nn.Linear:
        out, inp = self.weight.shape
        return self._filled(nn.Linear(inp, out, bias=self.bias is not None))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, pool={tuple(self.pool.shape)}"
