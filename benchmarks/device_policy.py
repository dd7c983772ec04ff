"""One place that decides how a run uses its device: the NWS search path, where training data
lives, and compilation. Nothing else in the suite branches on ``device.type == "cuda"`` for
these choices; tests force any choice on CPU.

Defaults (decided here, measured where said):

- ``search``: ``"certificates"`` on CPU (the incremental search saves FLOPs and runs as
  compiled loops), ``"full"`` elsewhere (one exact chunked search per step: static shapes, no
  host sync, so a GPU step is launch-bound, not search-bound). ``$NWS_SEARCH`` or
  ``--search`` forces either on any device.
- ``data_on_device``: in-memory benchmarks keep each task as one uint8 tensor on the training
  device and augment whole batches there, CUB-to-Sketches from its decoded cache
  (:mod:`benchmarks.data.batches`, :mod:`benchmarks.data.decode_cache`). On by default
  everywhere (also CPU: 52k against 4.4k Split-CIFAR images/s per thread, measured by
  ``python -m benchmarks.data.throughput``); off, the per-image DataLoader path runs.
- ``compile``: ``torch.compile`` of the training step; off unless asked for (``--compile``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

SEARCH_ENV = "NWS_SEARCH"
SearchPath = Literal["full", "certificates"]
SEARCH_PATHS: tuple[str, ...] = ("full", "certificates")


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; any other name as torch reads it.
    Raises ``ValueError`` (CLI exit 2) for a name torch does not read as a device and for a
    CUDA device that is not visible."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device; give auto, cpu, cuda or "
                         f"cuda:N") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: {count} CUDA device(s) visible here; use "
                             f"--device cpu (or auto), or check CUDA_VISIBLE_DEVICES")
    return device


def default_search(device: torch.device) -> SearchPath:
    """``$NWS_SEARCH`` when set, else certificates on CPU and the full search elsewhere."""
    forced = os.environ.get(SEARCH_ENV, "").strip()
    if forced:
        if forced not in SEARCH_PATHS:
            raise ValueError(f"{SEARCH_ENV}={forced!r}; valid: {', '.join(SEARCH_PATHS)}")
        return forced  # type: ignore[return-value]
    return "certificates" if device.type == "cpu" else "full"


@dataclass(frozen=True)
class DevicePolicy:
    """How one run uses ``device``; built once by the harness and passed down."""

    device: torch.device
    search: SearchPath
    data_on_device: bool = True
    compile: bool = False

    @classmethod
    def for_device(cls, device: torch.device | str, *, search: str | None = None,
                   data_on_device: bool | None = None, compile: bool = False
                   ) -> DevicePolicy:
        """The policy for ``device``; each keyword given overrides its default."""
        device = resolve_device(device) if isinstance(device, str) else device
        chosen = search or default_search(device)
        if chosen not in SEARCH_PATHS:
            raise ValueError(f"search {chosen!r}; valid: {', '.join(SEARCH_PATHS)}")
        return cls(device, chosen,  # type: ignore[arg-type]
                   True if data_on_device is None else data_on_device, compile)

    def describe(self) -> dict[str, Any]:
        """JSON-ready, for ``env.json``."""
        return asdict(self) | {"device": str(self.device)}
