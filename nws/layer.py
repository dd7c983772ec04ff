"""NWS layers: temporary kernels W, a frozen layer-wise pool M, and the selected kernels K.

Forward (paper §4.1): every group of W (``group_size`` consecutive k x k kernels in
out-major, then in-channel order; a group may span output channels) is replaced by its
nearest pool entry (Eq. 1); the convolution runs with K; the gradient reaches W unchanged
(straight-through: out = f(W + sg(K - W))). The search is incremental (see
:mod:`nws.search`) and is redone only when W or the pool changed since the last one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nws.full_search import ScalarPoolSearch, VectorPoolsSearch
from nws.search import Searcher, search_path, searcher_for


class _StraightThrough(torch.autograd.Function):
    """Forward returns the selected kernels; backward hands the gradient to W unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        return selected

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _SimilaritySum(torch.autograd.Function):
    """sum_l scale_l ||W_l - sg(K_l)||^2 over many layers in a few foreach ops; backward
    2 scale_l (W_l - K_l) x grad (the differences kept from the forward)."""

    @staticmethod
    def forward(ctx, selected: list[torch.Tensor], scales: list[float],
                *weights: torch.Tensor) -> torch.Tensor:
        diffs = torch._foreach_sub(list(weights), selected)
        sq = torch._foreach_norm(diffs)
        torch._foreach_mul_(sq, sq)
        torch._foreach_mul_(sq, scales)
        ctx.diffs, ctx.scales = diffs, [2.0 * s for s in scales]
        return torch.stack(sq).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        grads = torch._foreach_mul(ctx.diffs, ctx.scales)
        torch._foreach_mul_(grads, grad)
        ctx.diffs = None
        return (None, None, *grads)


def similarity_sum(layers: Sequence[NWSLayer], beta: float) -> torch.Tensor:
    """beta x sum over ``layers`` of mean((sg(K) - W)^2), K of this step
    (:meth:`NWSLayer.step_selected`): a fixed handful of ops for any number of layers."""
    ks = [layer.step_selected() for layer in layers]
    scales = [beta / layer.weight.numel() for layer in layers]
    return _SimilaritySum.apply(ks, scales, *(layer.weight for layer in layers))


# ``NWSLayer._key`` after a compiled forward: K is that forward's, W's version unknown there.
_COMPILED = ("compiled",)


def _rewritten(before: tuple, now: tuple) -> bool:
    """Whether the pools keyed ``now`` are those keyed ``before`` (same layers, storage,
    device and shape), only written since (a newer version): their searcher's tables are
    then refreshed in place, not built anew."""
    return len(before) == len(now) and all(
        a[0] == b[0] and a[1][1:] == b[1][1:] for a, b in zip(before, now, strict=True))


class SearchGroup:
    """NWS layers whose full searches run together: one forward's first layer searches them
    all, one batched :class:`~nws.full_search.VectorPoolsSearch` per entry length and device
    (scalar pools one ``searchsorted`` each), so a step costs a fixed number of launches per
    layer and no host sync. :func:`nws.nwsify` puts the layers it converts in one group; a
    layer built alone is its own. Members on the certificates path are skipped. Searchers are
    rebuilt when a member's pool changes (version, storage, device or shape)."""

    def __init__(self, layers: Sequence[NWSLayer]) -> None:
        self.layers = list(layers)
        self._vector: dict[tuple, tuple[tuple, VectorPoolsSearch]] = {}
        self._scalar: dict[int, tuple[tuple, ScalarPoolSearch]] = {}

    def __getstate__(self) -> dict:
        """Copies and pickles keep the members, not the cached tables (rebuilt on use)."""
        return {"layers": self.layers}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["layers"])

    @torch.no_grad()
    def search(self, only: Sequence[NWSLayer] | None = None, *, rebuild: bool = False) -> None:
        """Search every full-path member (or ``only`` these layers) for W as it is now;
        ``rebuild``: from the pools as they are (else tables cached by pool version)."""
        layers = list(only) if only is not None else [m for m in self.layers
                                                      if m.path() == "full"]
        batches: dict[tuple, list[NWSLayer]] = {}
        for layer in layers:
            if layer.dim == 1:
                self._search_scalar(layer, rebuild)
            else:
                batches.setdefault((layer.pool.device, layer.dim), []).append(layer)
        for key, batch in batches.items():
            searcher = self._vector_searcher(key, batch, rebuild)
            rows = [layer.weight.reshape(-1, layer.dim) for layer in batch]  # no_grad: no detach
            selected, index = searcher.search(rows)
            start = 0
            for i, (layer, k) in enumerate(zip(batch, selected, strict=True)):
                end = start + k.shape[0]
                layer._take_full(k.view_as(layer.weight), (index, start, end,
                                                           searcher.offsets[i]))
                start = end

    def _vector_searcher(self, key: tuple, batch: list[NWSLayer],
                         rebuild: bool) -> VectorPoolsSearch:
        pools = tuple((id(layer), layer._pool_key()) for layer in batch)
        cached = self._vector.get(key)
        if not rebuild and cached is not None and cached[0] != pools and _rewritten(
                cached[0], pools):  # the same pools written in place (pretraining's EMA)
            cached[1].refresh([layer.pool for layer in batch])
            cached = self._vector[key] = (pools, cached[1])
        if rebuild or cached is None or cached[0] != pools:
            cached = (pools, VectorPoolsSearch([layer.pool for layer in batch]))
            self._vector[key] = cached
        return cached[1]

    def _search_scalar(self, layer: NWSLayer, rebuild: bool) -> None:
        cached = self._scalar.get(id(layer))
        pool = ((id(layer), layer._pool_key()),)
        if not rebuild and cached is not None and cached[0] != pool and _rewritten(
                cached[0], pool):
            cached[1].refresh(layer.pool)
            cached = self._scalar[id(layer)] = (pool, cached[1])
        if rebuild or cached is None or cached[0] != pool:
            cached = (pool, ScalarPoolSearch(layer.pool))
            self._scalar[id(layer)] = cached
        values, rank = cached[1].search(layer.weight)
        layer._take_full(values.view_as(layer.weight), (rank, cached[1]))

    @staticmethod
    def pool_index(layer: NWSLayer, rank: tuple) -> torch.Tensor:
        """Pool indices (int64) of ``layer``'s rows from the rank its last search recorded."""
        if len(rank) == 2:  # scalar pool: rank among distinct values
            return rank[1].index(rank[0])
        index, start, end, offset = rank
        return index[start:end] - offset


class NWSLayer(nn.Module):
    """Base of :class:`NWSConv2d` and :class:`NWSLinear`; subclasses define ``_op``.

    ``search``: ``"full"`` (the sync-free exact search of every row at every forward,
    :mod:`nws.full_search`), ``"certificates"`` (incremental, :mod:`nws.search`) or None:
    ``$NWS_SEARCH``, else certificates on CPU and full elsewhere (:func:`search_path`).

    Freshness (issue 15 item 10): :meth:`search`, :meth:`indices` and :meth:`selected`
    search W as it is, from tables rebuilt from the pool as it is, so every way of changing
    either (``.data``, in place under ``no_grad``, ``load_state_dict``, ``copy_``) is seen.
    A forward pass always searches W again (the full path every row; the certificates
    compare W with where it was certified), with the pool's tables cached by the pool's
    version and storage (pools are frozen during a task; the EMA rule writes them with
    ``copy_``). Writes through ``.data`` bump no version counter, so a pool written through
    ``.data`` reaches a forward only after one of the calls above, and the similarity
    term's reuse of the forward's K (same step, by W's version and storage) does not see a
    ``.data`` write between the forward and the loss.

    Under ``torch.compile`` (issue 25) a full-path forward runs :meth:`_compiled_selected`:
    the layer's own exact search, tables made from the pool in the graph, no Python checks,
    so the step is captured whole (0 graph breaks; a recompile only for a new batch shape:
    ``python -m benchmarks.profile --compile-counts``) with the eager path's values. The
    certificates path is incremental by design (data-dependent sizes, host reads) and stays
    fragmented under compile: its eager code runs between many small graphs.
    """

    def __init__(self, weight: torch.Tensor, pool: torch.Tensor, group_size: int = 1,
                 bias: torch.Tensor | None = None, search: str | None = None) -> None:
        super().__init__()
        kernel = int(weight[0, 0].numel()) if weight.ndim > 2 else 1
        dim = group_size * kernel
        if weight.numel() % dim:
            raise ValueError(f"group size {group_size} does not divide the "
                             f"{weight.numel() // kernel} kernels of a {tuple(weight.shape)} "
                             "weight")
        if pool.ndim != 2 or pool.shape[1] != dim:
            raise ValueError(f"pool must be (n, {dim}) for this layer, got {tuple(pool.shape)}")
        if search is not None:
            search_path(weight.device, search)  # validates the name
        self.group_size = group_size
        self.search_path = search
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("pool", pool.detach().clone().float())
        self.search_group: SearchGroup = SearchGroup([self])
        self.reset_search()

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
    def path(self) -> str:
        """The search this layer runs now (``"full"`` or ``"certificates"``)."""
        return search_path(self.weight.device, self.search_path)

    def _state_key(self) -> tuple:
        w = self.weight
        return (w._version, w.data_ptr(), w.device, self._pool_key(), self.path())

    def _pool_key(self) -> tuple:
        p = self.pool
        return (p._version, p.data_ptr(), p.device, tuple(p.shape))

    def reset_search(self) -> None:
        """Forget the cached search (done automatically when W or the pool changes)."""
        self._searcher: Searcher | None = None
        self._selected: torch.Tensor | None = None
        self._key: tuple | None = None
        self._index: torch.Tensor | None = None  # full path: pool indices, made when asked
        self._rank: tuple | None = None  # full path: where its last search put each row
        self._used = True  # the cached K was used by a forward: the next one searches again

    @torch.no_grad()
    def search(self, hint: torch.Tensor | None = None) -> torch.Tensor:
        """Indices of the selected pool entries for W as it is now (exact).

        ``hint``: indices W is believed to be a lookup of (see :meth:`start_from`)."""
        self._refresh(hint, force=True, rebuild=True)
        return self._current_index()

    def last_index(self) -> torch.Tensor:
        """The indices the last forward pass used (searched now if there was none)."""
        if self._selected is None:
            return self.search()
        return self._current_index()

    def _current_index(self) -> torch.Tensor:
        if self._searcher is not None:
            return self._searcher.index
        if self._index is None:
            self._index = self.search_group.pool_index(self, self._rank)
        return self._index

    def _refresh(self, hint: torch.Tensor | None = None, *, force: bool = False,
                 together: bool = False, rebuild: bool = False) -> None:
        """Bring the search and K up to date with W and the pool: searched again when W's
        version, storage, device, the pool or the path changed, or always (``force``).
        ``together``: the full path searches the whole :attr:`search_group` at once.
        ``rebuild``: the pool's tables are rebuilt too if the pool's values changed (a pool
        written through ``.data``; on the certificates path compared with a copy, a sync:
        only the public calls do this, never a training step)."""
        key = self._state_key()
        if not force and self._key == _COMPILED:  # the compiled forward's K, this step's
            self._key = key
        if self._key == key and not force:
            return
        if key[-1] == "full":
            self.search_group.search(None if together else [self], rebuild=rebuild)
            if self._key != key:  # not a member of its group (e.g. a copied layer)
                self.search_group.search([self], rebuild=rebuild)
            return
        if (self._key is None or self._key[3:] != key[3:] or self._searcher is None
                or (rebuild and not torch.equal(self.pool, self._pool_seen))):
            self._searcher = searcher_for(self.pool.detach(), self.num_groups)
            self._pool_seen = self.pool.detach().clone()  # what the searcher's tables hold
            self._selected = None
        changed = self._searcher.update(self.rows(), hint=hint)
        if self._selected is None or changed is None:  # None: every row was looked up
            self._selected = self._searcher.kernels()
        elif changed.numel():
            self._selected.index_copy_(0, changed, self._searcher.kernels(changed))
        self._key = key

    def _take_full(self, selected: torch.Tensor, rank: tuple) -> None:
        """Called by :class:`SearchGroup`: the full path's result for the current W."""
        self._searcher = None
        self._selected, self._rank, self._index = selected, rank, None
        self._key, self._used = self._state_key(), False

    @torch.no_grad()
    def start_from(self, index: torch.Tensor) -> None:
        """W <- lookup(index) (Algorithm 1, line 3), with the search certified from the pool's
        gaps instead of recomputed."""
        self.weight.copy_(self.pool[index.to(self.pool.device).long()].view_as(self.weight))
        self.reset_search()
        self.search(hint=index)

    def selected(self) -> torch.Tensor:
        """K for W as it is now, shaped like W (no gradient; the pool is a lookup table)."""
        with torch.no_grad():
            self._refresh(force=True, rebuild=True)
        return self._kernels()

    def step_selected(self) -> torch.Tensor:
        """K of this step: the last forward's when W and the pool are unchanged since (by
        version and storage), else searched now. What the similarity term uses."""
        with torch.no_grad():
            self._refresh(together=True)
        return self._kernels()

    def _forward_selected(self) -> torch.Tensor:
        """K for this forward pass: searched again unless a search since the last forward
        already holds (the full path searches the whole group at the group's first layer)."""
        with torch.no_grad():
            self._refresh(force=self._used, together=True)
        self._used = True
        return self._kernels()

    def _kernels(self) -> torch.Tensor:
        """The cached K shaped like W (the full path stores it so; the certificates as rows)."""
        k = self._selected
        return k if k.shape == self.weight.shape else k.view_as(self.weight)

    def indices(self) -> torch.Tensor:
        return self.search().clone()

    # -- losses ----------------------------------------------------------------------------
    def similarity(self) -> torch.Tensor:
        """mean((sg(K) - W)^2): pulls W towards its selected entries (Eq. 2, second term)."""
        return similarity_sum([self], 1.0)

    def distillation(self) -> torch.Tensor:
        """mean((sg(W) - K)^2) with K differentiable w.r.t. the pool (Eq. 4, gradient rule)."""
        k = self.pool[self.last_index()].view_as(self.weight)
        return F.mse_loss(k, self.weight.detach())

    @torch.no_grad()
    def _compiled_selected(self) -> torch.Tensor:
        """K for a forward inside ``torch.compile`` on the full path: this layer's exact full
        search (the same searchers and values as :class:`SearchGroup`'s, one layer at a
        time), its tables made from the pool in the graph: a pure function of W and the pool,
        with none of the eager path's Python checks of versions, storage and caches (each a
        graph break or a recompile). The result is kept for :meth:`step_selected` and
        :meth:`last_index` as a forward's is (:data:`_COMPILED`: the compiled forward cannot
        read W's version, so the similarity term takes it as this step's K)."""
        if self.dim == 1:
            scalar = ScalarPoolSearch(self.pool)
            values, rank = scalar.search(self.weight)
            selected, index = values.view_as(self.weight), scalar.index(rank)
        else:
            (k,), index = VectorPoolsSearch([self.pool]).search([self.rows()])
            selected = k.view_as(self.weight)
        self._searcher, self._rank = None, None
        self._selected, self._index, self._key, self._used = selected, index, _COMPILED, True
        return selected

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and self.path() == "full":
            selected = self._compiled_selected()
        else:
            selected = self._forward_selected()
        return self._op(x, _StraightThrough.apply(self.weight, selected))

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

    def __init__(self, conv: nn.Conv2d, pool: torch.Tensor, group_size: int = 1,
                 search: str | None = None) -> None:
        if conv.padding_mode != "zeros":
            raise ValueError("NWSConv2d supports padding_mode='zeros' only")
        super().__init__(conv.weight, pool, group_size, conv.bias, search)
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
