"""lzma sizes of integer streams (the paper's memory convention), cached on disk by content.

The paper's rule for NWS lzma-compresses each task's int16 index stream twice over
(docs/reference.md §5). For ResNet-18's ~1.4M indices per task that took most of
``analysis.tables``' time on the mini benchmark (measured: docs/performance.md, The quick start),
paid again by every ``analysis.tables`` and ``analysis.figures`` call. So sizes are cached with
``joblib.Memory``, keyed by the stream's content, dtype and passes (a changed stream is a new key,
never a stale size), under ``$NWS_CACHE_DIR/lzma`` (default ``~/.cache/nws_bench/lzma``); where that
folder cannot be written, sizes are computed every time. Several streams are compressed at once in
threads (``lzma`` releases the GIL; measured against serial: docs/performance.md, The quick start).
"""

from __future__ import annotations

import lzma
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import joblib
import numpy as np


def cache_root() -> Path:
    """``$NWS_CACHE_DIR`` if set, else ``~/.cache/nws_bench`` (derived values only: safe to
    delete at any time)."""
    env = os.environ.get("NWS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nws_bench"


def _lzma_size(data: np.ndarray, passes: int) -> int:
    out = data.tobytes()
    for _ in range(passes):
        out = lzma.compress(out)
    return len(out)


@cache
def _cached(root: Path):
    """``_lzma_size`` memoised on disk under ``root/lzma``, or plain where it is unwritable."""
    folder = root / "lzma"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:
        return _lzma_size
    memo = joblib.Memory(folder, verbose=0).cache(_lzma_size)

    def size(data: np.ndarray, passes: int) -> int:
        """The stored size; a damaged or foreign cache file is dropped and the size recomputed
        (and stored again), silently: joblib's own load path would log a traceback."""
        if memo.check_call_in_cache(data, passes):
            try:
                out = memo.call_and_shelve(data, passes).get()
            except Exception:  # a truncated or garbled pickle, an unreadable file
                out = None
            if type(out) is int and out > 0:
                return out
            try:
                memo.call_and_shelve(data, passes).clear()
            except OSError:
                return _lzma_size(data, passes)
        try:
            return memo(data, passes)
        except OSError:  # the cache's disk filled up or became read-only: compute it plainly
            return _lzma_size(data, passes)

    return size


def lzma_nbytes(values: np.ndarray, dtype: str, passes: int = 1) -> int:
    """Bytes of ``values`` stored as ``dtype`` (e.g. ``"<i2"``, little-endian int16), then
    ``lzma.compress`` (preset 6) ``passes`` times over. Cached by content (module doc)."""
    return lzma_nbytes_many([values], dtype, passes)[0]


def lzma_nbytes_many(streams: Sequence[np.ndarray], dtype: str, passes: int = 1) -> list[int]:
    """:func:`lzma_nbytes` of each stream, computed in parallel threads (one per CPU)."""
    size = _cached(cache_root().resolve())
    arrays = [np.ascontiguousarray(v, dtype=np.dtype(dtype)) for v in streams]
    if len(arrays) < 2:
        return [size(a, passes) for a in arrays]
    with ThreadPoolExecutor(min(len(arrays), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda a: size(a, passes), arrays))
