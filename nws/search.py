"""Exact nearest-pool-entry search (Eq. 1): chunked, incremental, and cheap where it repeats.

``nearest`` computes, for each row ``w`` of a (d, D) matrix, the index of the pool entry
``p`` minimising ||w - p||^2 = ||w||^2 - 2 w.p + ||p||^2, one chunk of rows at a time (one
product [w, 1] [-2p, ||p||^2]^T per chunk), so the full (d x n) distance matrix is never
materialised. Ties go to the lowest index. The argmin is blocked (:func:`_first_two_min`):
CPU ``argmin`` over 512 columns is a scalar loop, ``amin`` is vectorised.

A layer searches through :func:`searcher_for` (the contract: :class:`Searcher`):

- :class:`FullSearch` (layers of at most ``SMALL_LAYER_ROWS`` rows) searches every row at
  every call: below that size one product and argmin cost less than the certificates.
- :class:`Certificates` (kernels of D > 1 values) makes the search incremental. Each search
  also returns where the row sits in its nearest entry's Voronoi cell: the distance to the
  nearest bisector (the cell boundary), the ``PLANES`` nearest bisectors themselves, and the
  distance to all others. A row that moved less than the first keeps its entry; one that
  moved further is tested exactly against those planes, and against the others by its
  distance from where it was searched, and kept if still inside; only the rest is searched.
  Every distance is shrunk by a bound on its rounding error, so a skip is taken only when it
  is certain (by the triangle inequality: a move shorter than the distance to a plane cannot
  cross it).
- :class:`ScalarLookup` (1x1 layers: scalar pools) looks every row up in a table of cells.

This is the ``certificates`` path (the CPU default); :mod:`nws.full_search` is the ``full``
path (sync-free, every row every step: the default elsewhere), chosen by :func:`search_path`.
Searches run in IEEE float32 even inside an autocast (AMP) region or with TF32 enabled: see
:func:`full_precision`.
On CPU the searches and the certificates' check run as compiled loops where they build
(:mod:`nws.cpu_kernels`); the eager code here is their reference, and the tests run both.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Protocol

import torch

from nws.cpu_kernels import kernels_for

# Rows per chunk: chunk x n distances stay a few MiB (2048 x 512 float32 = 4 MiB); 2048 was
# the fastest chunk tried (measured: docs/performance.md, NWS search internals).
CHUNK_ROWS = 2048


SEARCH_ENV = "NWS_SEARCH"
SEARCH_PATHS = ("full", "certificates")


def device_default_search(device_type: str) -> str:
    """The search a device type runs when neither an argument nor ``$NWS_SEARCH`` chooses:
    ``"certificates"`` on CPU, ``"full"`` elsewhere."""
    return "certificates" if device_type == "cpu" else "full"


def search_path(device: torch.device, explicit: str | None = None) -> str:
    """The search a layer on ``device`` runs: ``explicit`` when given, else ``$NWS_SEARCH``,
    else ``"certificates"`` on CPU (incremental, compiled loops) and ``"full"`` elsewhere (the
    sync-free exact search of :mod:`nws.full_search`). Raises ValueError on another name."""
    chosen = explicit or os.environ.get(SEARCH_ENV, "").strip()
    if not chosen:
        return device_default_search(device.type)
    if chosen not in SEARCH_PATHS:
        raise ValueError(f"NWS search {chosen!r} (argument or ${SEARCH_ENV}); valid: "
                         f"{', '.join(SEARCH_PATHS)}")
    return chosen


# The float32 matmul precision flags a search forces to IEEE: (namespace, legacy TF32 flag).
_PRECISION_FLAGS = (("cuda", "matmul"), ("mkldnn", "matmul"))


def _flag_spaces() -> list[tuple[object, str]]:
    """(object, attribute) of every matmul precision flag this torch has: the new
    ``fp32_precision`` where present, else CUDA's legacy ``allow_tf32``."""
    spaces = []
    for backend, op in _PRECISION_FLAGS:
        space = getattr(getattr(torch.backends, backend, None), op, None)
        if space is None:
            continue
        if hasattr(space, "fp32_precision"):
            spaces.append((space, "fp32_precision"))
        elif backend == "cuda":
            spaces.append((space, "allow_tf32"))
    return spaces


@contextlib.contextmanager
def ieee_fp32_matmul():
    """Float32 products in IEEE precision inside, the user's flags restored after.

    Sets each matmul precision flag through the API this torch has (``fp32_precision =
    "ieee"``; ``allow_tf32 = False`` on torch without it) and puts back the value read: the
    new flag reads back whatever the user set through either API (also
    ``torch.backends.fp32_precision`` and ``torch.set_float32_matmul_precision``), and the
    legacy flag is never read where it would raise. Host-side only: no device work.
    """
    saved = [(space, name, getattr(space, name)) for space, name in _flag_spaces()]
    try:
        for space, name, _ in saved:
            setattr(space, name, "ieee" if name == "fp32_precision" else False)
        yield
    finally:
        for space, name, value in reversed(saved):
            setattr(space, name, value)


@contextlib.contextmanager
def full_precision(device: torch.device):
    """A context in which products are exact IEEE float32: autocast (bf16/fp16 AMP) off for
    ``device`` and TF32 (or CPU bf16) matmuls off (:func:`ieee_fp32_matmul`).

    The search runs inside the forward pass, so under AMP its products would otherwise be
    bf16 and neither the argmin nor the certificates would be exact. Inside a
    ``torch.compile`` graph only autocast is switched off: the matmul precision flags are
    host state a graph cannot set, so the full search's product is then an opaque op that
    sets them itself (:func:`nws.full_search.ieee_addmm`).
    """
    if torch.compiler.is_compiling():  # precision flags cannot be set inside a graph
        with torch.autocast(device_type=device.type, enabled=False):
            yield
        return
    with torch.autocast(device_type=device.type, enabled=False), ieee_fp32_matmul():
        yield


def matmul_eps(device: torch.device) -> float:
    """Unit roundoff bound of a float32 product on ``device``: IEEE float32, because every
    search product runs inside :func:`full_precision`."""
    return float(torch.finfo(torch.float32).eps)


@dataclass
class Nearest:
    index: torch.Tensor  # (d,) int64, lowest index among equally near entries
    d1: torch.Tensor  # (d,) distance to the nearest entry (direct difference)
    d2: torch.Tensor  # (d,) distance to the second-nearest entry (direct difference)


def _pool_sq_norms(pool: torch.Tensor) -> torch.Tensor:
    return pool.pow(2).sum(1)


def _expanded_pool(pool: torch.Tensor, pool_sq: torch.Tensor) -> torch.Tensor:
    """[-2p, ||p||^2]^T, (D + 1, n): with :func:`_with_ones` rows, one product gives
    ||p||^2 - 2 w.p per entry (the row's own ||w||^2 does not change its argmin). A single
    product, because addmm's broadcast bias costs an extra pass over the matrix on CPU."""
    return torch.cat([pool * -2.0, pool_sq[:, None]], 1).t().contiguous()


def _with_ones(rows: torch.Tensor) -> torch.Tensor:
    """[w, 1], (d, D + 1)."""
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)


def nearest_index(rows: torch.Tensor, pool: torch.Tensor, *, chunk: int = CHUNK_ROWS,
                  pool_sq: torch.Tensor | None = None, compiled: bool = True) -> torch.Tensor:
    """Index of the nearest pool entry for every row (ties: lowest index). ``compiled``: on
    CPU, the compiled per-row search where it builds (k-means' assignments: 20 x 65,536 rows
    per layer)."""
    return _search(rows, pool, chunk=chunk, pool_sq=pool_sq, second=False,
                   compiled=compiled).index


def nearest(rows: torch.Tensor, pool: torch.Tensor, *, chunk: int = CHUNK_ROWS,
            pool_sq: torch.Tensor | None = None) -> Nearest:
    """Nearest index plus the nearest and second-nearest distances (direct differences)."""
    return _search(rows, pool, chunk=chunk, pool_sq=pool_sq, second=True, compiled=False)


@torch.no_grad()
def _search(rows: torch.Tensor, pool: torch.Tensor, *, chunk: int,
            pool_sq: torch.Tensor | None, second: bool, compiled: bool) -> Nearest:
    with full_precision(rows.device):
        return _search_chunks(rows, pool, chunk=chunk, pool_sq=pool_sq, second=second,
                              compiled=compiled)


def _search_chunks(rows: torch.Tensor, pool: torch.Tensor, *, chunk: int,
                   pool_sq: torch.Tensor | None, second: bool, compiled: bool) -> Nearest:
    if rows.ndim != 2 or pool.ndim != 2 or rows.shape[1] != pool.shape[1]:
        raise ValueError(f"rows {tuple(rows.shape)} and pool {tuple(pool.shape)} must be "
                         "(d, D) and (n, D)")
    rows = rows.to(pool.dtype)
    if pool.shape[1] == 1:
        return _search_scalar(rows[:, 0], pool[:, 0])
    pool_sq = _pool_sq_norms(pool) if pool_sq is None else pool_sq
    pool_aug = _expanded_pool(pool, pool_sq)
    if not second:
        index = _nearest_rows(rows, pool, pool_aug, chunk, compiled)
        return Nearest(index, index.new_empty(0, dtype=rows.dtype),
                       index.new_empty(0, dtype=rows.dtype))
    d = rows.shape[0]
    index = torch.empty(d, dtype=torch.long, device=rows.device)
    d1 = torch.empty(d, dtype=rows.dtype, device=rows.device)
    d2 = torch.empty_like(d1)
    rows_aug, block = _with_ones(rows), _block_size(pool.shape[0])
    for start in range(0, d, chunk):
        part = slice(start, start + chunk)
        best, runner = _first_two_min(rows_aug[part] @ pool_aug, block, True)
        index[part] = best
        d1[part] = (rows[part] - pool[best]).norm(dim=1)
        d2[part] = (rows[part] - pool[runner]).norm(dim=1)
    return Nearest(index, d1, d2)


def _nearest_rows(rows: torch.Tensor, pool: torch.Tensor, pool_aug: torch.Tensor, chunk: int,
                  compiled: bool) -> torch.Tensor:
    """Nearest entry (int64) of every row: on CPU the compiled per-row search where it builds
    and takes the pool (``compiled``), else the chunked product and argmin."""
    kernels = kernels_for(rows, compiled and pool.dtype == rows.dtype
                          and _compiled_pool_fits(pool))
    if kernels is not None:
        return kernels.nearest_entry(rows.contiguous(), pool_aug).long()
    return _argmin_chunks(rows, pool_aug, chunk)


def _argmin_chunks(rows: torch.Tensor, pool_aug: torch.Tensor, chunk: int) -> torch.Tensor:
    """Nearest entry of every row, given the pool's :func:`_expanded_pool` (ties: lowest)."""
    block, rows_aug = _block_size(pool_aug.shape[1]), _with_ones(rows)
    if rows.shape[0] <= chunk:
        return _first_two_min(rows_aug @ pool_aug, block, False)[0]
    index = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
    for start in range(0, rows.shape[0], chunk):
        part = slice(start, start + chunk)
        index[part] = _first_two_min(rows_aug[part] @ pool_aug, block, False)[0]
    return index


def _block_size(n: int) -> int:
    """Columns per block for :func:`_first_two_min` (0: no blocking, plain argmin)."""
    return next((b for b in (32, 16, 8) if n % b == 0 and n // b >= 2), 0)


def _first_two_min(dist: torch.Tensor, block: int,
                   second: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row: the first column holding the minimum, and (``second``) another column holding
    the minimum of the remaining ones.

    ``argmin`` over 512 columns is a scalar loop on CPU (far slower than ``amin``; measured:
    docs/performance.md, NWS search internals), so the
    row is cut into blocks: a vectorised ``amin`` per block, then ``argmin`` over the block
    minima and within the one winning block. The first block holding the row minimum holds
    its first occurrence, so ties still go to the lowest index.
    """
    if not block:
        best = dist.argmin(1)
        if not second:
            return best, None
        return best, dist.scatter(1, best[:, None], float("inf")).argmin(1)
    c, n = dist.shape
    blocks = dist.view(c, n // block, block)
    block_min = blocks.amin(2)
    b1 = block_min.argmin(1)
    rows = torch.arange(c, device=dist.device)
    inner = blocks[rows, b1]  # (c, block) copy of the winning block
    j1 = inner.argmin(1)
    best = b1 * block + j1
    if not second:
        return best, None
    # Runner-up: the second entry of the winning block, or the best of the other blocks.
    inner[rows, j1] = float("inf")
    j2 = inner.argmin(1)
    runner = b1 * block + j2
    block_min[rows, b1] = float("inf")
    b2 = block_min.argmin(1)
    outside = torch.nonzero(block_min[rows, b2] < inner[rows, j2]).squeeze(1)
    if outside.numel():
        b2 = b2[outside]
        runner[outside] = b2 * block + blocks[outside, b2].argmin(1)
    return best, runner


def _search_scalar(x: torch.Tensor, pool: torch.Tensor) -> Nearest:
    """1x1 layers (scalar pools): binary search among the distinct sorted pool values.

    The second distance is to the nearest other *distinct* value (a neighbour in sorted
    order): an entry equal to the nearest one shares its value, so it can never take the lead.
    """
    uniq, canon, mids = _distinct_values(pool)
    rank = _nearest_rank(x, mids, canon).long()
    top = len(uniq) - 1
    inf = x.new_tensor(float("inf"))
    below = torch.where(rank > 0, (x - uniq[(rank - 1).clamp_min(0)]).abs(), inf)
    above = torch.where(rank < top, (x - uniq[(rank + 1).clamp_max(top)]).abs(), inf)
    return Nearest(canon[rank], (x - uniq[rank]).abs(), torch.minimum(below, above))


def _distinct_values(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A scalar pool's distinct values (sorted), the lowest pool index holding each, and the
    float64 midpoints between consecutive ones (exact for float32 values of similar scale)."""
    vals, order = torch.sort(values, stable=True)  # equal values: lowest index first
    first = torch.ones_like(vals, dtype=torch.bool)
    first[1:] = vals[1:] != vals[:-1]
    uniq = vals[first].contiguous()
    return uniq, order[first], (uniq[:-1].double() + uniq[1:].double()) / 2


def _nearest_rank(x: torch.Tensor, mids: torch.Tensor, canon: torch.Tensor) -> torch.Tensor:
    """Rank (int32) of each value's nearest distinct value, by binary search among the
    midpoints; a value on a midpoint goes to the side with the lower pool index."""
    x = x.double()
    below = torch.searchsorted(mids, x, side="left")  # the cell's rank
    upto = torch.searchsorted(mids, x, side="right")  # one more on a midpoint
    return torch.where(canon[upto] < canon[below], upto, below).int()


class Searcher(Protocol):
    """What a layer asks of its search (:func:`searcher_for` picks the implementation)."""

    searched_last: int  # rows searched or looked up by the last update (diagnostics)

    @property
    def index(self) -> torch.Tensor | None:
        """Every row's pool index (lowest among equally near entries), as of the last update."""

    def update(self, rows: torch.Tensor, *, hint: torch.Tensor | None = None,
               chunk: int = CHUNK_ROWS) -> torch.Tensor | None:
        """Bring the search up to date with ``rows``; the positions whose entry was
        recomputed (None: all of them). ``hint``: indices the rows are believed to be copies
        of (first call)."""

    def kernels(self, where: torch.Tensor | None = None) -> torch.Tensor:
        """Selected pool rows: of every row, or of the rows at ``where``."""


# Layers with at most this many rows are searched in full at every call (:class:`FullSearch`):
# below it, the certificates' ~40 small tensor operations per call cost more than the search
# they save (both searchers timed on the same rows; measured: docs/performance.md, NWS search
# internals).
SMALL_LAYER_ROWS = 8192


def searcher_for(pool: torch.Tensor, num_rows: int) -> Searcher:
    """The searcher a layer of ``num_rows`` rows uses with this pool: table lookup for scalar
    pools, a full search per call for small layers, certificates otherwise."""
    if pool.shape[1] == 1:
        return ScalarLookup(pool)
    return FullSearch(pool) if num_rows <= SMALL_LAYER_ROWS else Certificates(pool)


class _VectorSearcher:
    """What :class:`FullSearch` and :class:`Certificates` share: the pool and its lookups."""

    index: torch.Tensor | None

    def __init__(self, pool: torch.Tensor) -> None:
        self.pool = pool
        self.searched_last = 0  # rows searched in the last update (for diagnostics)

    def _stored_index(self) -> torch.Tensor:
        """The index as kept (any integer type ``index_select`` takes)."""
        return self.index

    def kernels(self, where: torch.Tensor | None = None) -> torch.Tensor:
        """Selected pool rows: of every row, or of the rows at ``where``."""
        index = self._stored_index()
        return self.pool.index_select(0, index if where is None else index.index_select(0, where))


class FullSearch(_VectorSearcher):
    """Every row searched at every call: for small layers (MobileNetV2's depthwise convs, the
    stems), where one product and argmin cost less than keeping certificates up to date."""

    def __init__(self, pool: torch.Tensor) -> None:
        super().__init__(pool)
        self.pool_aug = _expanded_pool(pool, _pool_sq_norms(pool))
        self.index = None  # the last search
        self.use_compiled = True  # one compiled pass on CPU, where it builds

    @torch.no_grad()
    def update(self, rows: torch.Tensor, *, hint: torch.Tensor | None = None,
               chunk: int = CHUNK_ROWS) -> None:
        """Exact indices for every row (None: all were recomputed). ``hint`` is accepted for
        :class:`Certificates`' interface."""
        rows = rows.detach().to(self.pool.dtype)
        with full_precision(rows.device):
            self.index = _nearest_rows(rows, self.pool, self.pool_aug, chunk, self.use_compiled)
        self.searched_last = rows.shape[0]
        return None


# Bisector planes a certificate checks exactly before falling back to a search (see
# :class:`Certificates`): 2 came close to the floor (the rows whose nearest entry really
# changed) that 4 reached; measured: docs/performance.md, NWS search internals.
PLANES = 2


_HALF_MAX = float(torch.finfo(torch.float16).max)


def _down16(x: torch.Tensor) -> torch.Tensor:
    """float16 no larger than ``x``: a lower bound stays a lower bound at half the memory.

    Rounding to nearest moves a value by at most 2^-11 of itself (normal range) or 2^-25
    (subnormal), so shrinking by 2^-10 relative and 2^-24 absolute first keeps the result
    below ``x``; the clamp keeps large values finite. Four plain passes: cheaper on CPU than
    a round-down by comparison and ``nextafter``. A negative result only forces a re-test.
    """
    return x.mul(1 - 2.0**-10).sub_(2.0**-24).clamp_(max=_HALF_MAX).half()


@dataclass
class Cell:
    """Where each row sits in its nearest entry's Voronoi cell. Compact: the distances are
    float16 rounded down (see :func:`_down16`), indices int32, planes int16 where they fit."""

    index: torch.Tensor  # (d,) int32 nearest entry (lowest index on ties)
    radius: torch.Tensor  # (d,) distance to the nearest bisector plane: the cell boundary
    planes: torch.Tensor  # (d, PLANES): entries of the nearest bisectors (index: none)
    beyond: torch.Tensor  # (d,) distance from the origin to every other bisector plane

    @classmethod
    def zeros(cls, d: int, pool_size: int, device: torch.device) -> Cell:
        plane_type = torch.int16 if pool_size <= torch.iinfo(torch.int16).max else torch.int32
        return cls(torch.zeros(d, dtype=torch.int32, device=device),
                   torch.zeros(d, dtype=torch.float16, device=device),
                   torch.zeros(d, PLANES, dtype=plane_type, device=device),
                   torch.zeros(d, dtype=torch.float16, device=device))


class Certificates(_VectorSearcher):
    """Incremental exact search: each row keeps its nearest entry while a certificate holds.

    A row that moved less than ``radius`` from its anchor (where it was last certified) is
    still inside its cell. A row further from its anchor is tested exactly at its new position
    against the ``PLANES`` nearest bisectors (direct differences, with a rounding allowance),
    and against all the others by its distance from its origin (where it was last searched):
    closer to the origin than ``beyond`` is still on its entry's side of them. If it passes it
    is re-anchored where it is; only the rest is searched again.

    On CPU the check runs as one compiled pass over the rows (:mod:`nws.cpu_kernels`) where
    that builds; the eager code (:meth:`_recertify`) is the reference and the fallback.

    ``beyond`` is measured from the origin (net displacement), not reduced by every
    re-anchoring move (path length): under SGD rows drift to and fro, and path length
    exhausts ``beyond`` for rows that have not gone far; net displacement searches fewer
    rows per step (kept rows drift on from their origin and run out later; measured on
    ResNet-34's first task: docs/performance.md, NWS search internals). The origin is
    kept in float16 (2 bytes a value) and its rounding error is taken off ``beyond`` when it
    is stored.
    """

    def __init__(self, pool: torch.Tensor) -> None:
        super().__init__(pool)
        self.cells = _Cells(pool)
        self.anchor: torch.Tensor | None = None  # rows where they were last certified
        self.origin: torch.Tensor | None = None  # float16 rows where they were last searched
        self.cell: Cell | None = None
        self.use_compiled = True  # the check in one compiled pass on CPU, where it builds

    @property
    def index(self) -> torch.Tensor | None:
        return None if self.cell is None else self.cell.index.long()

    @property
    def radius(self) -> torch.Tensor | None:
        return None if self.cell is None else self.cell.radius

    def _stored_index(self) -> torch.Tensor:
        return self.cell.index  # int32: lookups without the int64 copy :attr:`index` makes

    def _start(self, rows: torch.Tensor, hint: torch.Tensor | None, chunk: int) -> torch.Tensor:
        """First call: every row is searched, except copies of their hinted entry, whose cell
        is the entry's own (the pool's rows searched against the pool). Returns the stale."""
        d = rows.shape[0]
        self.anchor = rows.clone()
        self.origin = rows.half()
        self.cell = Cell.zeros(d, self.pool.shape[0], rows.device)
        if hint is None:
            return torch.arange(d, device=rows.device)
        hint = hint.to(rows.device).long()
        copy = (rows == self.pool[hint]).all(1)
        exact = torch.nonzero(copy).squeeze(1)
        self._settle(exact, rows.index_select(0, exact),
                     _picked(self.cells.search(self.pool, chunk, self.use_compiled),
                             hint[exact]))
        return torch.nonzero(~copy).squeeze(1)

    def _settle(self, where: torch.Tensor, rows: torch.Tensor, found: Cell) -> None:
        """Rows ``where`` (now at ``rows``) were searched: anchor and origin where they are.
        ``beyond`` is shrunk by the float16 rounding of the origin (exact norm, with a rounding
        allowance), so it bounds the distance from the stored origin."""
        origin = rows.half()
        slack = torch.linalg.vector_norm(rows - origin.float(), dim=1)
        slack = slack.mul_(1 + 64 * matmul_eps(rows.device))
        found.beyond = _down16(found.beyond.float().sub_(slack))
        _assign(self.cell, where, found)
        self.anchor[where] = rows
        self.origin[where] = origin

    def _recertify(self, rows: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Rows ``where`` moved past their radius. Those still on their entry's side of the
        nearest bisectors (tested exactly) and within ``beyond`` of their origin keep their
        entry and are re-anchored where they are: radius = distance to the nearest of those
        planes or to the ``beyond`` sphere. ``where`` is left holding the others."""
        cell, eps = self.cell, matmul_eps(rows.device)
        w = rows.index_select(0, where)
        index, planes = cell.index[where], cell.planes[where]
        n, dim = self.pool.shape
        near = (w - self.pool.index_select(0, index)).pow_(2).sum(1, keepdim=True)
        other = self.pool.index_select(0, planes.reshape(-1).int()).view(-1, PLANES, dim)
        other = other.sub_(w[:, None]).pow_(2).sum(2)
        # Each squared distance is within (dim + 2) u of itself; 4x that, both sides.
        margin = other - near - 2 * (dim + 2) * eps * (other + near)
        no_plane = planes == index[:, None]
        drift = torch.linalg.vector_norm(w - self.origin.index_select(0, where).float(), dim=1)
        beyond = cell.beyond[where] - drift.mul_(1 + 64 * eps)
        inside = ((margin > 0) | no_plane).all(1) & (beyond > 0)
        keep, lost = where[inside], where[~inside]
        pair = (index[:, None] * n + planes).reshape(-1)  # int32: n^2 < 2^31
        to_plane = margin.mul_(self.cells.inv_gap.view(-1).index_select(0, pair).view_as(margin))
        to_plane = to_plane.masked_fill_(no_plane, float("inf")).amin(1) * self.cells.shrink
        self.anchor[keep] = w[inside]
        cell.radius[keep] = _down16(torch.minimum(to_plane, beyond * self.cells.shrink)[inside])
        return lost

    @torch.no_grad()
    def update(self, rows: torch.Tensor, *, hint: torch.Tensor | None = None,
               chunk: int = CHUNK_ROWS) -> torch.Tensor:
        """Exact indices for ``rows`` (:attr:`index`); returns the positions whose index was
        recomputed.

        ``hint`` (first call only): indices the rows are believed to be copies of (a task
        started from the previous task's kernels). Rows that equal their hinted entry
        exactly are certified without a search; the rest are searched.
        """
        rows = rows.detach().to(self.pool.dtype)
        if self.anchor is None or self.anchor.shape != rows.shape:
            stale = self._start(rows, hint, chunk)
        elif (kernels := kernels_for(rows, self.use_compiled
                                     and self.cell.planes.dtype == torch.int16)) is not None:
            cell = self.cell
            stale = kernels.recertify(rows.contiguous(), self.anchor, self.origin, cell.radius,
                                      cell.beyond, cell.index, cell.planes, self.pool,
                                      self.cells.inv_gap, matmul_eps(rows.device),
                                      self.cells.shrink)
        else:
            moved = torch.linalg.vector_norm(rows - self.anchor, dim=1)
            stale = torch.nonzero(moved >= self.cell.radius).squeeze(1)
            if stale.numel():
                stale = self._recertify(rows, stale)
        self.searched_last = int(stale.numel())
        if stale.numel():
            sub = rows.index_select(0, stale)
            self._settle(stale, sub, self.cells.search(sub, chunk, self.use_compiled))
        return stale


_CELL_FIELDS = ("index", "radius", "planes", "beyond")


def _assign(cell: Cell, where: torch.Tensor, found: Cell) -> None:
    """cell[where] = found."""
    for name in _CELL_FIELDS:
        getattr(cell, name)[where] = getattr(found, name)


def _compiled_pool_fits(pool: torch.Tensor) -> bool:
    """Whether the compiled searches take this pool: entries in whole 8-lane blocks, and
    (planes are int16 there) at most 32767 of them. Pools of other sizes search eagerly."""
    n = pool.shape[0]
    return n % 8 == 0 and 0 < n <= torch.iinfo(torch.int16).max


def _picked(cell: Cell, pick: torch.Tensor) -> Cell:
    """The rows ``pick`` of ``cell``."""
    return Cell(*(getattr(cell, name)[pick] for name in _CELL_FIELDS))


class _Cells:
    """The pool's Voronoi cells: a search that also says where each row sits in its cell.

    For the nearest entry i and any other j, a row w stays closer to p_i than to p_j while it
    moves less than its distance to their bisector, (d_j^2 - d_i^2) / (2 ||p_j - p_i||); the
    minimum over j is the distance to the cell boundary (at least (d_2 - d_1) / 2, often many
    times more when w sits far from both entries). ``d_j^2 - d_i^2`` comes from the expanded
    distances of the search itself (||w||^2 cancels) and is shrunk by a bound on their
    rounding error, so the distances are certainties, not estimates. Exact duplicates of an
    entry are left out: the lowest-index copy always wins, so a later copy bounds nothing.
    """

    def __init__(self, pool: torch.Tensor) -> None:
        n, dim = pool.shape
        pool_sq = _pool_sq_norms(pool)
        gaps = torch.cdist(pool.double(), pool.double())
        same = gaps == 0
        later_copy = (same & torch.ones_like(same).tril(-1)).any(1)  # equals a lower index
        sq = pool_sq.masked_fill(later_copy, float("inf"))  # never nearest, bounds nothing
        self.pool_aug = _expanded_pool(pool, sq)
        # 1 / (2 ||p_j - p_i||); on the diagonal any finite value (d_i is set to inf there).
        # float32: a float16 table halves its memory, but its mixed-type multiply is slower.
        self.inv_gap = (0.5 / gaps).masked_fill_(torch.eye(n, dtype=torch.bool,
                                                           device=pool.device), 1.0).float()
        self.block = _block_size(n)
        self.dim = dim
        self.pool_max_sq = float(pool_sq.max()) if n else 0.0
        # relative rounding of the product by 1 / (2 gap) and of the movement ||w' - w||
        self.shrink = 1 - 64 * float(torch.finfo(torch.float32).eps)
        self.compiled_fits = _compiled_pool_fits(pool)

    @torch.no_grad()
    def search(self, rows: torch.Tensor, chunk: int, compiled: bool = True) -> Cell:
        """Nearest entry and cell geometry of every row (``compiled``: on CPU, one compiled
        pass where it builds; the chunked eager code below is the reference)."""
        # |rounding error| of one expanded distance (a dot product of dim + 1 terms, in any
        # order, fused or not) is at most (dim + 1) u (||w||^2 + 3 max||p||^2), u = eps / 2;
        # two enter each difference; this allowance is 4x that bound or more.
        err_scale = 4 * (self.dim + 3) * matmul_eps(rows.device)
        kernels = kernels_for(rows, compiled and self.compiled_fits)
        if kernels is not None:
            return Cell(*kernels.cell_search(rows.contiguous(), self.pool_aug, self.inv_gap,
                                             err_scale, self.pool_max_sq, self.shrink, PLANES))
        d = rows.shape[0]
        cell = Cell.zeros(d, self.inv_gap.shape[0], rows.device)
        rows_aug = _with_ones(rows)
        with full_precision(rows.device):
            for start in range(0, d, chunk):
                part = slice(start, start + chunk)
                self._search_chunk(rows[part], rows_aug[part], err_scale, cell, part)
        return cell

    def _search_chunk(self, rows: torch.Tensor, rows_aug: torch.Tensor, err_scale: float,
                      cell: Cell, part: slice) -> None:
        dist = rows_aug @ self.pool_aug
        best, _ = _first_two_min(dist, self.block, second=False)
        at = best[:, None]
        err = err_scale * (rows.pow(2).sum(1, keepdim=True) + 3 * self.pool_max_sq)
        floor = dist.gather(1, at) + err
        dist.scatter_(1, at, float("inf"))
        bisector = dist.sub_(floor).mul_(self.inv_gap.index_select(0, best))
        cell.index[part] = best
        for k in range(PLANES):  # the nearest bisectors, in order
            plane, _ = _first_two_min(bisector, self.block, second=False)
            gap = bisector.gather(1, plane[:, None]).squeeze(1)
            if k == 0:
                cell.radius[part] = _down16(gap.clamp_min(0.0) * self.shrink)
            cell.planes[part, k] = torch.where(torch.isinf(gap), best, plane)  # inf: no plane
            bisector.scatter_(1, plane[:, None], float("inf"))
        cell.beyond[part] = _down16(bisector.amin(1).clamp_min_(0.0) * self.shrink)


class ScalarLookup:
    """Exact nearest entry of a scalar pool (1x1 layers) for every row, by table lookup.

    The certificates of :class:`Certificates` rarely hold for scalars (a 512-entry pool cuts the
    weight range into narrow cells: in MobileNetV2 training a large share of the scalar rows change
    entry every step) and a binary search per value is slow on CPU (measured: docs/performance.md,
    NWS search internals), so every call looks up all rows. The pool's range is cut into
    ``bins_per_value`` equal bins per distinct value; each bin's neighbourhood (one bin either side,
    against rounding of the bin number) holds at most one midpoint between consecutive distinct
    values in almost every bin, so a row's cell is the bin's lower cell, or the next one when the
    row reaches the bin's threshold: the float32 form of that midpoint, rounded so that a row
    exactly on it goes to the lower pool index of the two values. Rows in the rare bins holding
    several midpoints are placed among the midpoints by binary search (:func:`_nearest_rank`). A
    call finds each row's rank among the distinct values; the selected values come from the rank
    directly and pool indices only when asked (:attr:`index`).

    One gather per row reads both the bin's lower cell and its threshold (packed in 64 bits),
    faster than one gather each (measured against that design: docs/performance.md, NWS
    search internals).
    """

    def __init__(self, pool: torch.Tensor, bins_per_value: int = 64) -> None:
        if pool.ndim != 2 or pool.shape[1] != 1:
            raise ValueError(f"a scalar pool is (n, 1), got {tuple(pool.shape)}")
        self.pool = pool
        uniq, self.canon, self.mids = _distinct_values(pool[:, 0])
        self.uniq = uniq
        self.rank: torch.Tensor | None = None  # per row: rank of its value, the last call
        self._index: torch.Tensor | None = None
        self._values: torch.Tensor | None = None  # the selected values, when compiled
        self.use_compiled = True  # one compiled pass on CPU, where it builds
        self.searched_last = 0
        self.low = float(uniq[0])
        span = float(uniq[-1]) - self.low
        # Bins must stay wider than the rounding of (x - low) * scale, i.e. than a few ulps.
        ulp = float(torch.finfo(pool.dtype).eps) * float(uniq.abs().max())
        self.bins = min(bins_per_value * len(uniq), int(span / (8 * ulp)) if ulp else 0)
        self.table: torch.Tensor | None = None  # per bin: (lower cell, threshold) in 64 bits
        if len(uniq) == 1 or self.bins < 4:
            return
        self.scale = self.bins / span
        edge = torch.arange(self.bins + 1, dtype=torch.float64, device=pool.device) / self.scale
        lo = self.low + edge[:-1] - 1 / self.scale
        hi = self.low + edge[1:] + 1 / self.scale
        lo[0], hi[-1] = -float("inf"), float("inf")  # the end bins also take what is clamped
        first = torch.searchsorted(self.mids, lo, side="left")  # midpoints below the bin
        count = torch.searchsorted(self.mids, hi, side="right") - first
        self.several = bool((count > 1).any())
        cell = torch.where(count <= 1, first, -1).int()  # -1: several midpoints, search
        threshold = self._thresholds(first.clamp_max(len(self.mids) - 1), count == 1)
        self.table = torch.stack([cell, threshold.view(torch.int32)], 1).view(torch.int64)[:, 0]

    def _thresholds(self, mid_at: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
        """Per bin: the smallest float32 that belongs to the upper cell (NaN: none does)."""
        mid = self.mids[mid_at]
        # A row on the midpoint goes to the lower pool index: the upper cell starts at the
        # midpoint (>=) when its value has the lower index, just above it (>) otherwise.
        upper_wins = self.canon[mid_at + 1] < self.canon[mid_at]
        t = mid.float()
        below = t.double() < mid
        on = t.double() == mid
        bump = below | (on & ~upper_wins)
        t = torch.where(bump, torch.nextafter(t, torch.tensor(float("inf"))), t)
        return torch.where(one, t, float("nan"))  # x >= nan is never true, not even for inf

    def _exact_rank(self, x: torch.Tensor) -> torch.Tensor:
        return _nearest_rank(x, self.mids, self.canon)

    @property
    def index(self) -> torch.Tensor | None:
        """Pool index of every row at the last call (lowest index among equal values)."""
        if self._index is None and self.rank is not None:
            self._index = self.canon.index_select(0, self.rank)
        return self._index

    @torch.no_grad()
    def update(self, rows: torch.Tensor, *, hint: torch.Tensor | None = None,
               chunk: int = CHUNK_ROWS) -> None:
        """Rank every row (None: all rows were looked up). ``hint`` is accepted for
        :class:`Certificates`' interface."""
        x = rows.detach().to(self.pool.dtype).reshape(-1)
        self.searched_last, self._index, self._values = x.numel(), None, None
        if self.table is None:  # one distinct value, or a span too narrow for bins
            self.rank = self._exact_rank(x)
            return None
        if (kernels := kernels_for(x, self.use_compiled)) is not None:
            self.rank, self._values = kernels.scalar_lookup(
                x.contiguous(), self.table, self.uniq, self.mids, self.canon, self.low,
                self.scale)
            return None
        # float -> int32 (not int64: faster on CPU, docs/performance.md, NWS search internals);
        # NaN goes to bin 0 instead of raising.
        pos = (x - self.low).mul_(self.scale).nan_to_num_(0.0).clamp_(0, self.bins - 1).int()
        packed = self.table.index_select(0, pos).view(torch.int32).view(-1, 2)
        cell, threshold = packed[:, 0], packed[:, 1].view(torch.float32)
        # min() then nonzero(): a scan for the (rare) unsure bins only where one was hit.
        hit = self.several and int(cell.min()) < 0
        unsure = torch.nonzero(cell < 0).squeeze(1) if hit else None
        # out-of-place: int32 + bool is faster than the in-place += on CPU (measured:
        # docs/performance.md, NWS search internals)
        rank = cell + (x >= threshold)
        if unsure is not None:
            rank[unsure] = self._exact_rank(x.index_select(0, unsure))
        self.rank = rank
        return None

    def kernels(self, where: torch.Tensor | None = None) -> torch.Tensor:
        """Selected values, (rows, 1): of every row, or of the rows at ``where``."""
        if where is None and self._values is not None:  # the compiled lookup's own
            return self._values[:, None]
        rank = self.rank if where is None else self.rank.index_select(0, where)
        return self.uniq.index_select(0, rank)[:, None]
