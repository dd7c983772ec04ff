"""Count the aten ops and the host-sync-prone ops a piece of code dispatches.

On a GPU every aten op is a kernel launch (~5-10 us of host time) and a sync-prone op stalls
the host until the device catches up, so the counts on CPU are a proxy for a step's cost on a
GPU, measurable without one. A sync-prone op is one whose result shape or value the host
must read: ``nonzero``, boolean-mask indexing, ``.item()`` (``_local_scalar_dense``),
``unique``, ``masked_select``, ``repeat_interleave`` without ``output_size`` and the like.

>>> with OpCounter() as ops:
...     step()
>>> ops.total, ops.syncs, ops.sync_ops
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose output shape depends on data, or that copy a value to the host.
SYNC_OPS = frozenset({
    "aten.nonzero.default", "aten.nonzero.out", "aten._local_scalar_dense.default",
    "aten.masked_select.default", "aten.unique.default", "aten._unique.default",
    "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default",
    "aten.is_nonzero.default", "aten.equal.default", "aten.item.default",
    "aten.masked_scatter_.default", "aten.argwhere.default",
})


def _bool_index(func: Any, args: tuple, kwargs: dict) -> bool:
    """``x[mask]`` / ``x[mask] = v`` with a boolean mask: a nonzero inside."""
    name = str(func)
    if not name.startswith(("aten.index.", "aten.index_put", "aten._index_put_impl")):
        return False
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in indices or ())


def _repeat_interleave_without_size(func: Any, kwargs: dict, args: tuple) -> bool:
    name = str(func)
    if not name.startswith("aten.repeat_interleave"):
        return False
    return kwargs.get("output_size") is None and not (len(args) > 3 and args[3] is not None)


class OpCounter(TorchDispatchMode):
    """A dispatch mode that tallies every aten op (``counts``) and sync-prone op
    (``sync_counts``) run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.sync_counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.counts[name] += 1
        if (name in SYNC_OPS or _bool_index(func, args, kwargs)
                or _repeat_interleave_without_size(func, kwargs, args)):
            self.sync_counts[name] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        """aten ops dispatched."""
        return sum(self.counts.values())

    @property
    def syncs(self) -> int:
        """Sync-prone ops dispatched."""
        return sum(self.sync_counts.values())

    @property
    def sync_ops(self) -> dict[str, int]:
        return dict(self.sync_counts)
