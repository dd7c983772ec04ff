"""Weights files as people save them, read without ever running code from the file.

:func:`load_state_dict` accepts (decision: what a user would expect from ``--weights``):

- **safetensors** files (by content, whatever the suffix), read by the ``safetensors``
  library: no pickle at all, on every torch the project allows;
- **torch files** (``torch.save``, zip or legacy format), read with
  ``torch.load(weights_only=True)`` on CPU: tensors, plain containers, numbers and strings,
  plus the harmless objects training scripts put beside the weights (:func:`safe_globals`:
  ``argparse.Namespace``, numpy scalars/arrays/dtypes, ``pathlib`` paths; allowed only where
  torch offers ``safe_globals``/``add_safe_globals``, torch >= 2.4). Optimizer and scheduler
  state dicts, epochs and metrics are such plain data and are ignored;
- the state dict itself, or nested under ``state_dict``, ``model``, ``model_state_dict``,
  ``net``, ``network`` or ``module`` (searched in that order, up to 3 levels deep); only if
  none of those is present, the EMA weights under ``ema``, ``model_ema`` or
  ``state_dict_ema`` (to start from the EMA weights of a file that also has plain ones,
  extract them with the snippet below);
- wrapper prefixes: ``module.`` (DataParallel/DDP), ``_orig_mod.`` (``torch.compile``, also
  inside a key) and ``model.`` (wrapper modules), stripped while every key carries one.

Anything else (a pickled ``nn.Module``, a class of a training framework, arbitrary code) is
refused by torch's safe unpickler: nothing in the file is executed, and the run stops
(:class:`WeightsFileError`, CLI exit 2) naming the file, the object torch refused, and a
3-line snippet that extracts a plain state dict (to run on a file one trusts).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import pathlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

PLAIN_KEYS = ("state_dict", "model", "model_state_dict", "net", "network", "module")
EMA_KEYS = ("ema", "model_ema", "state_dict_ema")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
MAX_DEPTH = 3
_TORCH = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be had, or do not fit the architecture; the message says
    how to supply them (also raised by :mod:`benchmarks.models.archs`, which imports this)."""


class WeightsFileError(WeightsUnavailableError):
    """A weights file that cannot be read as a state dict; the message says what to do."""


def _numpy_globals() -> list[Any]:
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed core to _core
    out: list[Any] = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one dtype class per type
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes)
                if n.endswith("DType") and n != "ObjectDType" and not n.startswith("_")]
    if core is not getattr(np, "core", None) and _TORCH >= (2, 6):
        # numpy 2 reading a file numpy 1 wrote: the same functions under their old names
        # (torch >= 2.6 takes (object, "name") pairs).
        out += [(core.multiarray.scalar, "numpy.core.multiarray.scalar"),
                (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    return out


def safe_globals() -> list[Any]:
    """The non-tensor objects allowed in a torch weights file (all inert data)."""
    return [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath,
            pathlib.PureWindowsPath, *_numpy_globals()]


@contextlib.contextmanager
def _allowing_safe_globals() -> Iterator[None]:
    ser = torch.serialization
    if hasattr(ser, "safe_globals"):  # torch >= 2.5: scoped
        with ser.safe_globals(safe_globals()):
            yield
    elif hasattr(ser, "add_safe_globals"):  # torch 2.4: process-wide (these are inert)
        ser.add_safe_globals(safe_globals())
        yield
    else:  # torch 2.2/2.3: only tensors and plain containers
        yield


def is_safetensors(path: Path) -> bool:
    """safetensors' layout: an 8-byte little-endian header size, then a JSON header."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < Path(path).stat().st_size


def extraction_snippet(path: Path) -> str:
    return (f"    import torch\n"
            f"    ckpt = torch.load({str(path)!r}, map_location='cpu', weights_only=False)"
            f"  # only for a file you trust\n"
            f"    torch.save(ckpt['state_dict'], 'plain_state_dict.pt')"
            f"  # the key that holds the weights")


def _refuse(path: Path, why: str) -> WeightsFileError:
    return WeightsFileError(
        f"weights file {path}: {why}.\nThe suite reads state dicts (tensors by name, possibly "
        f"nested under 'state_dict'/'model'/'ema', with plain extras such as an "
        f"argparse.Namespace) and safetensors files, and never unpickles other objects. "
        f"To extract a plain state dict from a file you trust:\n{extraction_snippet(path)}\n"
        f"then pass --weights plain_state_dict.pt."
    )


def _damaged(path: Path, why: str) -> WeightsFileError:
    """A file no reader can parse: no extraction snippet (torch.load cannot read it either)."""
    return WeightsFileError(
        f"weights file {path}: {why}. It may be incomplete (an interrupted download or copy) "
        f"or another kind of file: check the path, or download it again")


def read_file(path: str | Path) -> Any:
    """The file's content: a dict of tensors (safetensors) or what ``torch.load`` returns
    under ``weights_only=True``. Raises :class:`WeightsFileError`."""
    path = Path(path)
    if is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise _damaged(path, f"not a readable safetensors file ({err})") from err
    try:
        with _allowing_safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        detail = f"torch refused {refused.group(1)}" if refused else str(err).splitlines()[0]
        raise _refuse(path, f"holds objects that are not plain data ({detail})") from err
    except Exception as err:  # a damaged or foreign file: torch raises many kinds
        raise _damaged(path, "not a torch or safetensors weights file "
                             f"({type(err).__name__}: {str(err)[:200]})") from err


def _tensor_items(obj: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}


def find_state_dict(obj: Any, depth: int = 0) -> tuple[dict[str, torch.Tensor], str] | None:
    """(tensors by name, where they were found: '' or 'state_dict' or 'model/ema' ...)."""
    if not isinstance(obj, dict) or depth > MAX_DEPTH:
        return None
    for group in (PLAIN_KEYS, EMA_KEYS):
        for key in group:
            if isinstance(obj.get(key), dict):
                found = find_state_dict(obj[key], depth + 1)
                if found is not None:
                    sd, where = found
                    return sd, f"{key}/{where}".rstrip("/")
    tensors = _tensor_items(obj)
    return (tensors, "") if tensors else None


def strip_wrappers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``_orig_mod.`` segments, then wrapper prefixes while every key has one."""
    sd = {k.replace("._orig_mod.", "."): v for k, v in sd.items()}
    changed = True
    while changed and sd:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k.removeprefix(prefix): v for k, v in sd.items()}
                changed = True
    return sd


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict (CPU tensors) from a weights file in any accepted form (module
    doc). Raises :class:`WeightsFileError` (exit 2) with how to extract one otherwise."""
    path = Path(path)
    found = find_state_dict(read_file(path))
    if found is None:
        raise _refuse(path, "holds no tensors by name (no state dict found at the top level "
                            f"or under {', '.join(PLAIN_KEYS + EMA_KEYS)})")
    sd, where = found
    if where:
        log.info("weights file %s: state dict under %r", path, where)
    return strip_wrappers(sd)
