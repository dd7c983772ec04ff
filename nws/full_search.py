"""The exact full search without host synchronisation: the GPU path of every NWS layer.

Every call searches every row (static shapes: no ``nonzero``, no boolean-mask indexing, no
``.item()``, no data-dependent sizes), so a training step can run ahead of the device or be
captured. ``$NWS_SEARCH=full`` (or ``search="full"``) forces this path on any device, which
is how the tests and :mod:`benchmarks.perf.opcount` run it on CPU; ``certificates`` is the
incremental CPU path of :mod:`nws.search` (see :func:`nws.search.search_path`).

Vector pools (:class:`VectorPoolsSearch`, several layers of one entry length at once):

1. per layer and chunk of rows, one product ``||p||^2 - 2 w.p`` (``addmm``, IEEE float32:
   :func:`nws.search.full_precision`), its ``REFINE`` smallest columns (``topk``) and the
   first column holding its minimum (``argmin``: exact ties among any number of entries
   keep their lowest index as a candidate);
2. for all layers together, the candidates' exact distances ``||w - p||^2`` recomputed from
   the differences in float64 (a gather), the smallest taken, ties to the lowest index (the
   candidates are sorted first and ``argmin`` takes the first minimum).

Exactness: float32 rounding of the expanded product can reorder entries whose distances
differ by less than about ``(D + 2) u (||w||^2 + ||p||^2)``; step 2 repairs any such reorder
among the candidates. The result equals the float64 brute force unless ``REFINE`` other
entries all come out below the true nearest one in float32, i.e. ``REFINE + 1`` entries
within that rounding bound of each other (exact ties are no such case when they tie in
float32 too, e.g. rows equal to zero or to a pool entry: ``argmin`` keeps the lowest).
Later exact copies of a pool entry never become candidates (a lower index wins them). On
MPS (no float64) step 2 runs in float32.

Scalar pools (:class:`ScalarPoolSearch`, 1x1 layers): one ``searchsorted`` per layer among
float32 thresholds, the smallest float32 of each cell, rounded so that a value on a midpoint
goes to the lower pool index of its two neighbours: exact for every float32 input.
"""

from __future__ import annotations

import torch

from nws.search import full_precision, ieee_fp32_matmul

# Candidates per row rechecked exactly (step 2 above).
REFINE = 4
# Distances per chunk of rows (float32): 2^26 = 256 MiB, 131,072 rows of a 512-entry pool
# (ResNet-18's largest layers in two chunks: fewer launches, memory a GPU has to spare).
CHUNK_ELEMENTS = 2**26


@torch.library.custom_op("nws::ieee_addmm", mutates_args=())
def ieee_addmm(bias: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``addmm(bias, rows, weight)`` in IEEE float32 whatever the TF32 flags say: the search's
    product inside a ``torch.compile`` graph, which cannot set those host flags itself (an
    opaque op: the flags are set around it when it runs, also while a CUDA graph records)."""
    with ieee_fp32_matmul():
        return torch.addmm(bias, rows, weight)


@ieee_addmm.register_fake
def _ieee_addmm_shape(bias: torch.Tensor, rows: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[1])


def refine_dtype(device: torch.device) -> torch.dtype:
    """float64 for the exact recheck, except on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def _later_copies(pool: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the entry equals one of lower index (never nearest: ties go lowest)."""
    same = (pool[:, None, :] == pool[None, :, :]).all(2)
    return (same & torch.ones_like(same).tril(-1)).any(1)


def _squares(pool: torch.Tensor) -> torch.Tensor:
    """(n,) ||p||^2 of each entry, inf for later copies (they never win a search)."""
    return pool.pow(2).sum(1).masked_fill(_later_copies(pool), float("inf"))


class VectorPoolsSearch:
    """Exact nearest entries for the rows of several layers, each with its own (n_l, D) pool
    (one entry length D, one device). Build once per set of pools; :meth:`search` per step."""

    def __init__(self, pools: list[torch.Tensor]) -> None:
        if not pools or len({(p.shape[1], p.device) for p in pools}) != 1:
            raise ValueError("pools must be a non-empty list of (n, D) tensors of one D and "
                             "device")
        pools = [p.detach().float() for p in pools]
        self.dim, self.device = pools[0].shape[1], pools[0].device
        self.k = min(REFINE, *(p.shape[0] for p in pools))
        self.offsets = [0]
        for p in pools[:-1]:
            self.offsets.append(self.offsets[-1] + p.shape[0])
        self.weights = [(p * -2.0).t().contiguous() for p in pools]  # (D, n): -2 p^T
        self.sq = [_squares(p) for p in pools]
        self.table = torch.cat(pools)  # all layers' entries, layer l from offsets[l]
        self.table_exact = self.table.to(refine_dtype(self.device))

    @torch.no_grad()
    def refresh(self, pools: list[torch.Tensor]) -> None:
        """The tables recomputed in place from ``pools`` of the shapes built with (their
        values written since, e.g. by the EMA rule of pretraining every step): the values a
        new searcher would hold, in the same storage, no host sync."""
        pools = [p.detach().float() for p in pools]
        for weight, sq, p in zip(self.weights, self.sq, pools, strict=True):
            weight.copy_(p.t()).mul_(-2.0)
            sq.copy_(_squares(p))
        torch.cat(pools, out=self.table)
        self.table_exact.copy_(self.table)

    def _candidates(self, rows: torch.Tensor, layer: int) -> torch.Tensor:
        """(R, k + 1) int64 per row: the first column holding the smallest expanded float32
        distance (``argmin``: the lowest index among exact float32 ties, however many) and
        the k smallest (``topk``, whose choice among ties is unspecified), chunked."""
        weight, sq = self.weights[layer], self.sq[layer]
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[1])
        # eager: full_precision has set the flags; a graph cannot (same op, same values)
        addmm = ieee_addmm if torch.compiler.is_compiling() else torch.addmm
        parts = []
        for s in range(0, rows.shape[0], chunk):
            dist = addmm(sq, rows if rows.shape[0] <= chunk else rows[s: s + chunk], weight)
            top = dist.topk(self.k, 1, largest=False, sorted=False).indices
            parts.append(torch.cat([dist.argmin(1, keepdim=True), top], 1))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def search(self, rows: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``rows[l]``: (R_l, D) float32 of layer l. Returns the selected entries (R_l, D) per
        layer and the index of every row into :attr:`table` (layer l's entry i is
        ``offsets[l] + i``), all rows of all layers in order. (``no_grad`` inside, not as a
        decorator: dynamo cannot call a decorated method of an object made in its graph.)"""
        with torch.no_grad():
            return self._search(rows)

    def _search(self, rows: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        with full_precision(self.device):
            cands = [self._candidates(r, i) for i, r in enumerate(rows)]
        if len(cands) > 1:
            torch._foreach_add_(cands, self.offsets)
        cand = (torch.cat(cands) if len(cands) > 1 else cands[0]).sort(1).values
        flat = torch.cat(rows) if len(rows) > 1 else rows[0]
        exact = self.table_exact.index_select(0, cand.view(-1)).view(*cand.shape, self.dim)
        dist = exact.sub_(flat.to(exact.dtype)[:, None]).square_().sum(2)
        index = cand.gather(1, dist.argmin(1, keepdim=True)).view(-1)
        selected = self.table.index_select(0, index)
        if len(rows) == 1:
            return [selected], index
        return list(selected.split([r.shape[0] for r in rows])), index


class ScalarPoolSearch:
    """Exact nearest entry of a scalar pool (n, 1) for every value: ``searchsorted`` among
    per-cell float32 thresholds (sync-free, static shapes: also the construction, so a pool
    written every step, as pretraining's EMA does, is searched without a host sync)."""

    def __init__(self, pool: torch.Tensor) -> None:
        if pool.ndim != 2 or pool.shape[1] != 1:
            raise ValueError(f"a scalar pool is (n, 1), got {tuple(pool.shape)}")
        self.values, self.canon, self.thresholds = _scalar_tables(pool)

    @torch.no_grad()
    def refresh(self, pool: torch.Tensor) -> None:
        """The tables recomputed in place from ``pool`` (same shape, values written since)."""
        for mine, new in zip((self.values, self.canon, self.thresholds), _scalar_tables(pool),
                             strict=True):
            mine.copy_(new)

    def search(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` (R, 1) or (R,). Returns the selected values (R, 1) and each row's rank
        among the sorted values (:meth:`index` turns ranks into pool indices)."""
        with torch.no_grad():
            rank = torch.searchsorted(self.thresholds, rows.reshape(-1).float(), right=True)
            return self.values.index_select(0, rank)[:, None], rank

    def index(self, rank: torch.Tensor) -> torch.Tensor:
        """Pool indices (int64) of ranks from :meth:`search`."""
        return self.canon.index_select(0, rank)


def _scalar_tables(pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, canon, thresholds) of a scalar pool: its n values ascending (copies kept:
    static shapes, no ``values[mask]``), the lowest pool index holding each (the first of its
    run of equal values, which a stable sort puts first), and :func:`_cell_starts`. Within a
    run of equal values the thresholds lie just above the value, so a rank lands on the run
    (same value, same index) whichever of its members it meets."""
    values, order = torch.sort(pool.detach().float()[:, 0], stable=True)
    first = torch.ones_like(values, dtype=torch.bool)
    first[1:] = values[1:] != values[:-1]
    position = torch.arange(len(values), device=values.device)
    run_start = torch.where(first, position, 0).cummax(0).values
    canon = order.index_select(0, run_start)
    return values, canon, _cell_starts(values, canon)


def _cell_starts(values: torch.Tensor, canon: torch.Tensor) -> torch.Tensor:
    """(n - 1,) float32, ascending: the smallest float32 nearer to ``values[r + 1]`` than to
    ``values[r]``, or exactly between them when ``values[r + 1]`` has the lower pool index
    (equal neighbours: the float32 just above them). A value's rank is then the number of
    thresholds at or below it."""
    if values.numel() < 2:
        return values.new_empty(0)
    lo, hi = values[:-1].double(), values[1:].double()
    mid = (lo + hi) / 2  # exact for float32 values of similar scale (< 2^29 apart in ulps)
    t = mid.float()
    upper_wins = canon[1:] < canon[:-1]
    bump = (t.double() < mid) | ((t.double() == mid) & ~upper_wins)
    return torch.where(bump, torch.nextafter(t, torch.full_like(t, float("inf"))), t)
