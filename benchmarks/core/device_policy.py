"""One place that decides how a run uses its device: the NWS search path, where training data
lives, and compilation. Nothing else in the suite branches on ``device.type == "cuda"`` for
these choices; tests force any choice on CPU.

Defaults (decided here, measured where said):

- ``search``: ``"certificates"`` on CPU (the incremental search saves FLOPs and runs as
  compiled loops), ``"full"`` elsewhere (one exact chunked search per step: static shapes, no
  host sync, so a GPU step is launch-bound, not search-bound). ``"full"`` also on CPU when
  the step is compiled (``--compile``): the certificates' work depends on the data (which
  rows to search, found with ``nonzero`` and boolean masks), so dynamo splits such a step
  into ~80 graphs by design, while the full search is traced whole with the step.
  ``$NWS_SEARCH`` or ``--search`` forces either on any device, compiled or not. The path is
  the policy field NWS names in its ``policy_fields`` (``policy_search`` in the run
  identity), so a compiled CPU run is a run of its own, as its indices may differ from the
  certificates' on float32 near ties.
- ``data_on_device``: in-memory benchmarks keep each task as one uint8 tensor on the training
  device and augment whole batches there, CUB-to-Sketches from its decoded cache
  (:mod:`benchmarks.data.batches`, :mod:`benchmarks.data.decode_cache`). On by default
  everywhere, CPU included, where it is also the faster path (measured by
  ``python -m benchmarks.perf.throughput``: docs/performance.md, Data pipeline); off, the
  per-image DataLoader path runs.
- ``crop_resample``: how CUB-to-Sketches' random resized crops are resampled
  (:class:`benchmarks.data.batches.ResizedCropAugment`): ``"per_image"`` on CPU (PyTorch's uint8
  resize per crop: reads the boxes on the host, and is the faster of the two on CPU; measured:
  docs/performance.md, Data pipeline), ``"batched"`` elsewhere (one ``grid_sample`` of the batch: no
  host read, one launch). ``$NWS_CROP_RESAMPLE`` forces either on any device (tests run both here).
  The two draw the same crops and differ by at most one uint8 level per pixel, so, like
  ``--workers``, the choice is recorded in ``env.json`` but is not part of the run identity (the
  device type, which sets its default, is).
- ``compile``: ``torch.compile`` of the model in the training step; off unless asked for
  (``--compile``; not yet measured on a GPU). Mode: ``"reduce-overhead"`` (CUDA-graph
  capture of the forward and backward) on CUDA, the default (inductor kernels, no graphs)
  elsewhere: :func:`compile_mode`. The harness passes ``policy.compile`` to
  ``benchmarks.engine.training.Trainer(..., compile=...)``.
- ``cudnn_benchmark``: cuDNN's autotuner (it times the convolution algorithms of each new
  shape and keeps the fastest): on for CUDA runs, off with ``--deterministic`` (the autotuner
  may pick a different algorithm per process) and off the GPU. Was: switched on as a side
  effect of seeding (``set_deterministic``), also on CPU.
- ``tf32``: TF32 (10-bit mantissa) tensor-core products for float32 convolutions and
  matmuls on CUDA. Off under ``amp=none``: the paper's numerics are IEEE float32 (PyTorch's
  own default leaves TF32 on for cuDNN convolutions, so an ``amp=none`` run used to train
  its convolutions in TF32). On under ``bf16``/``fp16`` autocast, where the products already
  run in 16 bits and only float32 leftovers would use it. Off the GPU (no effect there). The
  NWS search forces IEEE matmuls itself (:func:`nws.search.ieee_fp32_matmul`).

``cudnn_benchmark`` and ``tf32`` follow from the device, ``--deterministic`` and the amp
mode, which are all in the run identity, so they are not in it themselves; :meth:`apply`
sets them (the harness calls it once per run) and ``env.json`` records the policy and the
flags read back (:meth:`DevicePolicy.describe`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from nws.search import SEARCH_ENV, SEARCH_PATHS, search_path

SearchPath = Literal["full", "certificates"]
CROP_RESAMPLE_ENV = "NWS_CROP_RESAMPLE"
DEVICE_ENV = "NWS_DEVICE"  # what --device auto means, when set
# How random-resized crops are resampled (benchmarks.data.batches.ResizedCropAugment).
RESAMPLE_PATHS = ("batched", "per_image")
__all__ = ["CROP_RESAMPLE_ENV", "DEVICE_ENV", "SEARCH_ENV", "SEARCH_PATHS", "DevicePolicy",
           "backend_flags", "compile_mode", "compile_options", "default_crop_resample",
           "default_search", "resolve_device", "set_tf32"]


def resolve_device(name: str) -> torch.device:
    """``"auto"``: ``$NWS_DEVICE`` when set (the test suite sets ``cpu``: its CPU tests stay
    on the CPU where a GPU is visible), else CUDA when available, else CPU; any other name
    as torch reads it. Raises ``ValueError`` (CLI exit 2) for a name torch does not read as
    a device and for a CUDA device that is not visible."""
    if name == "auto" and os.environ.get(DEVICE_ENV, "auto") != "auto":
        name = os.environ[DEVICE_ENV]
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        where = f" (from ${DEVICE_ENV})" if os.environ.get(DEVICE_ENV) == name else ""
        raise ValueError(f"--device {name!r}{where} is not a device; give auto, cpu, cuda or "
                         f"cuda:N") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"--device {name}: {count} CUDA device(s) visible here; use "
                             f"--device cpu (or auto), or check CUDA_VISIBLE_DEVICES")
    return device


def default_search(device: torch.device, compile: bool = False) -> SearchPath:
    """``$NWS_SEARCH`` when set, else the full search for a compiled step (module doc), else
    certificates on CPU and the full search elsewhere (the NWS library's own rule,
    :func:`nws.search.search_path`)."""
    if compile and not os.environ.get(SEARCH_ENV, "").strip():
        return "full"
    return search_path(device)  # type: ignore[return-value]


def default_crop_resample(device: torch.device) -> str:
    """``$NWS_CROP_RESAMPLE`` when set, else ``"per_image"`` on CPU and ``"batched"``
    elsewhere (module doc). Raises ``ValueError`` for an unknown value."""
    chosen = os.environ.get(CROP_RESAMPLE_ENV) or (
        "per_image" if device.type == "cpu" else "batched")
    if chosen not in RESAMPLE_PATHS:
        raise ValueError(f"${CROP_RESAMPLE_ENV}={chosen!r}; valid: {', '.join(RESAMPLE_PATHS)}")
    return chosen


def compile_mode(device: torch.device) -> str:
    """``torch.compile`` mode for a training step on ``device``: CUDA graphs where the
    device has them (a captured step launches as one graph, the host is out of the loop),
    inductor's default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def compile_options(device: torch.device) -> dict[str, Any]:
    """Keyword arguments of ``torch.compile`` for a training step on ``device``."""
    return {"mode": compile_mode(device)}


# The TF32 switches: (torch.backends namespace, sub-namespace with the new
# ``fp32_precision`` API, the legacy ``allow_tf32`` attribute's object path)
_TF32 = {"conv": ("cudnn", "conv", ("cudnn",)), "matmul": ("cuda", "matmul", ("cuda", "matmul"))}


def _legacy_tf32(kind: str) -> object:
    """The object holding the legacy ``allow_tf32`` flag of ``kind`` (conv | matmul)."""
    obj: object = torch.backends
    for name in _TF32[kind][2]:
        obj = getattr(obj, name)
    return obj


def _tf32_switch(kind: str) -> tuple[object, str]:
    """(object, attribute) of the TF32 switch of ``kind``: the new ``fp32_precision`` where
    this torch has it (mixing it with the legacy flag raises on recent torch), else the
    legacy ``allow_tf32``."""
    backend, sub, _ = _TF32[kind]
    space = getattr(getattr(torch.backends, backend), sub, None)
    if space is not None and hasattr(space, "fp32_precision"):
        return space, "fp32_precision"
    return _legacy_tf32(kind), "allow_tf32"


def set_tf32(enabled: bool) -> None:
    """TF32 on or off for CUDA float32 convolutions and matmuls (host flags only)."""
    for kind in _TF32:
        space, name = _tf32_switch(kind)
        setattr(space, name, ("tf32" if enabled else "ieee") if name == "fp32_precision"
                else enabled)


def _tf32_on(kind: str) -> bool:
    space, name = _tf32_switch(kind)
    value = getattr(space, name)
    if name == "fp32_precision" and value != "none":
        return value == "tf32"
    # the legacy flag, or what "none" (inherit) falls back to: torch's defaults, conv on
    return bool(_legacy_tf32(kind).allow_tf32)


def backend_flags() -> dict[str, bool]:
    """The process's cuDNN and TF32 flags as set now (for ``env.json``)."""
    return {"cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "tf32_conv": _tf32_on("conv"), "tf32_matmul": _tf32_on("matmul")}


@dataclass(frozen=True)
class DevicePolicy:
    """How one run uses ``device``; built once by the harness and passed down."""

    device: torch.device
    search: SearchPath
    data_on_device: bool = True
    compile: bool = False
    crop_resample: str = "batched"
    cudnn_benchmark: bool = False
    tf32: bool = False

    @classmethod
    def for_device(cls, device: torch.device | str, *, search: str | None = None,
                   data_on_device: bool | None = None, compile: bool = False,
                   amp: str = "none", deterministic: bool = False) -> DevicePolicy:
        """The policy for ``device`` (a run under ``amp`` and ``--deterministic`` or not);
        each keyword given overrides its default."""
        device = resolve_device(device) if isinstance(device, str) else device
        chosen = search or default_search(device, compile)
        if chosen not in SEARCH_PATHS:
            raise ValueError(f"search {chosen!r}; valid: {', '.join(SEARCH_PATHS)}")
        cuda = device.type == "cuda"
        return cls(device, chosen,  # type: ignore[arg-type]
                   True if data_on_device is None else data_on_device, compile,
                   default_crop_resample(device), cudnn_benchmark=cuda and not deterministic,
                   tf32=cuda and amp != "none")

    def apply(self) -> None:
        """Set the process's cuDNN autotuner and TF32 flags as this policy decides."""
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        set_tf32(self.tf32)

    @property
    def compile_mode(self) -> str | None:
        """The ``torch.compile`` mode of the training step, or None when not compiling."""
        return compile_mode(self.device) if self.compile else None

    @property
    def pin_memory(self) -> bool:
        """Whether host batches (the DataLoader path) go to page-locked memory: when training
        on CUDA, so that the step's ``non_blocking`` copy overlaps; never otherwise (a CPU
        run on a machine with a GPU pins nothing)."""
        return self.device.type == "cuda"

    def describe(self) -> dict[str, Any]:
        """JSON-ready, for ``env.json``: the policy and the backend flags read back now."""
        return asdict(self) | {"device": str(self.device), "backend_flags": backend_flags()}
