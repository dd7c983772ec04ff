"""The artifact store: named blobs, shared and per task. Its bytes are the stored memory.

Layout under ``root``::

    index.json            the commit point: every blob's file, size, codec, dtype/shape, meta
    shared/<id>.bin       blobs kept once (backbones, pools, owner ids)
    task_003/<id>.bin     blobs of task 3 (indices, masks, BN, head)

A :class:`Transaction` writes new files under fresh names and then replaces ``index.json``
atomically, so a run killed at any moment leaves the last committed state intact; files
no index names are removed when the store is next opened. Stored memory is the sum of the
payload bytes the index names; the index itself is bookkeeping, reported as
:meth:`ArtifactStore.index_bytes`, not as memory.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.core.breakdown import Breakdown
from nws.atomic import atomic_write_bytes, atomic_write_text

SHARED = "shared"


def checksum(data: bytes | memoryview) -> str:
    """The checksum of stored bytes (blobs, phase checkpoints): BLAKE2b, 16-byte hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def checksum_file(path: str | Path, chunk: int = 2**24) -> str:
    """:func:`checksum` of a file's bytes, read in ``chunk``-byte pieces (inputs of a run:
    weights and pools files, possibly large)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class StoreIntegrityError(ValueError):
    """A blob's file is missing, shorter or longer than the index says, or fails its
    checksum: the stored task is damaged (the CLI stops with exit 2; analysis leaves the
    run out with a warning). ``path``: the blob's file; ``why``: what is wrong with it."""

    def __init__(self, message: str, path: Path, why: str) -> None:
        super().__init__(message)
        self.path, self.why = path, why


@dataclass
class BlobInfo:
    file: str
    nbytes: int
    codec: str = "bytes"
    dtype: str | None = None
    shape: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # checksum(payload); None in stores written before checksums (only their size is checked)
    blake2b: str | None = None


def _scope(task: int | None) -> str:
    return SHARED if task is None else f"task_{task:03d}"


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    arr = t.detach().to("cpu").contiguous().numpy()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def bytes_to_tensor(data: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    arr = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return torch.from_numpy(arr.astype(np.dtype(dtype), copy=True))


class ArtifactStore:
    """Read access plus transactions; see the module docstring for the layout."""

    def __init__(self, root: str | Path, *, readonly: bool = False) -> None:
        """Open (creating) a store. ``readonly=True`` is for readers of a store another
        process may be writing (analysis): it creates and cleans nothing and cannot write."""
        self.root = Path(root).resolve()
        self.readonly = readonly
        if not readonly:
            self.root.mkdir(parents=True, exist_ok=True)
        self._index = self._read_index()
        if not readonly:  # files of a transaction killed before its commit
            self._remove_unreferenced()

    # -- reading -------------------------------------------------------------------------
    def _read_index(self) -> dict[str, dict[str, BlobInfo]]:
        path = self.root / "index.json"
        if not path.exists():
            return {}
        raw = json.loads(path.read_text())
        return {s: {n: BlobInfo(**i) for n, i in blobs.items()} for s, blobs in raw.items()}

    def _remove_unreferenced(self) -> None:
        named = {i.file for blobs in self._index.values() for i in blobs.values()}
        for path in self.root.glob("*/*"):
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and rel not in named:
                path.unlink()

    def tasks(self) -> list[int]:
        return sorted(int(s.split("_")[1]) for s in self._index if s != SHARED)

    def has_task(self, task: int) -> bool:
        return _scope(task) in self._index

    def names(self, task: int | None = None) -> list[str]:
        return sorted(n for n in self._index.get(_scope(task), {}) if n != "__meta__")

    def info(self, name: str, task: int | None = None) -> BlobInfo:
        try:
            return self._index[_scope(task)][name]
        except KeyError:
            where = "shared" if task is None else f"task {task}"
            raise KeyError(
                f"artifact store {self.root} has no blob {name!r} in {where}; "
                f"it holds {self.names(task)}"
            ) from None

    def get_bytes(self, name: str, task: int | None = None) -> bytes:
        """The blob's payload, checked against the index: its size, and its checksum where
        the index has one; :class:`StoreIntegrityError` naming the run, task and file."""
        info = self.info(name, task)
        try:
            data = (self.root / info.file).read_bytes()
        except FileNotFoundError:
            raise self._damaged(name, task, info, "is missing") from None
        if len(data) != info.nbytes:
            raise self._damaged(name, task, info, f"has {len(data)} bytes where the index "
                                                  f"says {info.nbytes} (truncated or "
                                                  f"overwritten)")
        if info.blake2b is not None and checksum(data) != info.blake2b:
            raise self._damaged(name, task, info, "does not match its checksum in the index "
                                                  "(its bytes were changed)")
        return data

    def _damaged(self, name: str, task: int | None, info: BlobInfo,
                 why: str) -> StoreIntegrityError:
        run = self.root.parent if self.root.name == "artifacts" else self.root
        where = "the shared blobs" if task is None else f"task {task}"
        path = self.root / info.file
        return StoreIntegrityError(
            f"run {run}: the artifact store is damaged: {where}, blob {name!r}: its file "
            f"{path} {why}. Restore the run folder from a backup, or delete it to run that "
            f"run again", path, why)

    def verify(self) -> None:
        """Read every blob once (:meth:`get_bytes`'s checks); raises the first
        :class:`StoreIntegrityError`."""
        for scope in sorted(self._index):
            task = None if scope == SHARED else int(scope.split("_")[1])
            for name in self.names(task):
                self.get_bytes(name, task)

    def get_tensor(self, name: str, task: int | None = None) -> torch.Tensor:
        info = self.info(name, task)
        return bytes_to_tensor(self.get_bytes(name, task), info.dtype, info.shape)

    def get_tensors(self, name: str, task: int | None = None) -> dict[str, torch.Tensor]:
        """Read a blob written by :meth:`Transaction.put_tensors`."""
        info = self.info(name, task)
        data = self.get_bytes(name, task)
        out, offset = {}, 0
        for key, dtype, shape in info.meta["layout"]:
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            out[key] = bytes_to_tensor(data[offset : offset + size], dtype, shape)
            offset += size
        return out

    def task_meta(self, task: int) -> dict[str, Any]:
        """Bookkeeping stored with a task (not counted as memory), e.g. training time."""
        return self._index.get(_scope(task), {}).get("__meta__", BlobInfo("", 0)).meta

    # -- sizes ---------------------------------------------------------------------------
    def nbytes(self, task: int | None = None) -> int:
        """Payload bytes of one scope: ``None`` for the shared blobs, else one task's."""
        return sum(i.nbytes for i in self._index.get(_scope(task), {}).values())

    def total_bytes(self) -> int:
        """The stored memory: every payload byte the index names."""
        return sum(i.nbytes for blobs in self._index.values() for i in blobs.values())

    def nbytes_by_blob(self) -> dict[tuple[str, str], int]:
        return {
            (s, n): i.nbytes
            for s, blobs in self._index.items()
            for n, i in blobs.items()
            if n != "__meta__"
        }

    def breakdown(self) -> Breakdown:
        """The stored bytes by blob, shared and per task (tasks 0..last), comparable with a
        method's ``memory_formula``."""
        per_task = [{n: i.nbytes for n, i in self._index.get(_scope(t), {}).items()
                     if n != "__meta__"} for t in range(max(self.tasks(), default=-1) + 1)]
        return Breakdown({n: i.nbytes for n, i in self._index.get(SHARED, {}).items()},
                         per_task)

    def index_bytes(self) -> int:
        path = self.root / "index.json"
        return path.stat().st_size if path.exists() else 0

    # -- writing -------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Blobs put inside the ``with`` block become visible together, or not at all."""
        if self.readonly:
            raise PermissionError(f"artifact store {self.root} was opened read-only")
        tx = Transaction(self)
        try:
            yield tx
        except BaseException:
            tx.abort()
            raise
        tx.commit()


class Transaction:
    """Pending writes; see :meth:`ArtifactStore.transaction`."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self._pending: dict[str, dict[str, BlobInfo]] = {}
        self._written: list[Path] = []

    def put(
        self,
        name: str,
        data: bytes,
        *,
        task: int | None,
        codec: str = "bytes",
        dtype: str | None = None,
        shape: list[int] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Put one blob. ``task=None`` puts a shared blob (replacing any of that name)."""
        if not name or name == "__meta__":
            raise ValueError(f"invalid blob name {name!r}")
        scope = _scope(task)
        rel = f"{scope}/{uuid.uuid4().hex[:16]}.bin"
        atomic_write_bytes(self.store.root / rel, data)
        self._written.append(self.store.root / rel)
        self._pending.setdefault(scope, {})[name] = BlobInfo(
            rel, len(data), codec, dtype, shape, dict(meta or {}), checksum(data)
        )

    def put_tensor(self, name: str, tensor: torch.Tensor, *, task: int | None, **meta) -> None:
        """A raw little-endian tensor (lossless; its bytes are numel x itemsize)."""
        dtype = str(tensor.detach().cpu().numpy().dtype)
        self.put(
            name, tensor_to_bytes(tensor), task=task, codec="raw", dtype=dtype,
            shape=list(tensor.shape), meta=meta,
        )

    def put_tensors(self, name: str, tensors: dict[str, torch.Tensor], *, task: int | None) -> None:
        """Several raw tensors concatenated in one blob (e.g. a state dict or all BN layers)."""
        layout, parts = [], []
        for key, t in tensors.items():
            dtype = str(t.detach().cpu().numpy().dtype)
            layout.append([key, dtype, list(t.shape)])
            parts.append(tensor_to_bytes(t))
        self.put(name, b"".join(parts), task=task, codec="raw-concat", meta={"layout": layout})

    def set_task_meta(self, task: int, meta: dict[str, Any]) -> None:
        """Bookkeeping for a task (not memory): training time, steps, losses."""
        self._pending.setdefault(_scope(task), {})["__meta__"] = BlobInfo("", 0, "meta", meta=meta)

    def abort(self) -> None:
        for path in self._written:
            path.unlink(missing_ok=True)
        self._pending.clear()

    def commit(self) -> None:
        index = {s: dict(blobs) for s, blobs in self.store._index.items()}
        for scope, blobs in self._pending.items():
            if scope == SHARED:
                index.setdefault(scope, {}).update(blobs)
            else:  # a task is written whole: a rewrite replaces the previous version
                index[scope] = dict(blobs)
        raw = {s: {n: asdict(i) for n, i in b.items()} for s, b in sorted(index.items())}
        atomic_write_text(self.store.root / "index.json", json.dumps(raw, indent=1))
        self.store._index = index
        self.store._remove_unreferenced()
        self._pending = {}
