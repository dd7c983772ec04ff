"""Artifact-store integrity: every blob's checksum and size are in the index and checked on
every read. A flipped byte, a truncation or a lost file, in a shared blob or a task's, stops
with an error naming the run, the task and the file (exit 2 from the CLI) -- never a silent
wrong number (was: one flipped byte of an NWS delta blob changed thousands of later indices
and the re-evaluation exited 0) nor a ``struct.error`` traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmarks.core.store import ArtifactStore, StoreIntegrityError, checksum
from benchmarks.exec import run as cli

SHARED_BLOB, TASK_BLOB = ("pools", None), ("indices", 1)


def _store(run_dir: Path) -> ArtifactStore:
    store = ArtifactStore(run_dir / "artifacts")
    with store.transaction() as tx:
        tx.put_tensor("pools", torch.arange(64, dtype=torch.float32), task=None)
        tx.put_tensor("indices", torch.arange(32, dtype=torch.int16), task=1)
    return store


def _file(store: ArtifactStore, name: str, task: int | None) -> Path:
    return store.root / store.info(name, task).file


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


DAMAGE = {"flip": (_flip, "does not match its checksum"),
          "truncate": (_truncate, "bytes where the index says"),
          "delete": (Path.unlink, "is missing")}


@pytest.mark.parametrize("blob", [SHARED_BLOB, TASK_BLOB], ids=["shared", "task"])
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damage_to_a_blob_is_an_error_naming_run_task_and_file(tmp_path, kind, blob):
    name, task = blob
    store = _store(tmp_path / "run-x")
    path = _file(store, name, task)
    damage, why = DAMAGE[kind]
    damage(path)
    reopened = ArtifactStore(tmp_path / "run-x" / "artifacts", readonly=True)
    with pytest.raises(StoreIntegrityError) as err:
        reopened.get_tensor(name, task)
    text = str(err.value)
    assert why in text and str(tmp_path / "run-x") in text and str(path) in text
    assert ("the shared blobs" if task is None else f"task {task}") in text
    with pytest.raises(StoreIntegrityError):
        reopened.verify()
    other, other_task = TASK_BLOB if blob == SHARED_BLOB else SHARED_BLOB
    assert reopened.get_tensor(other, other_task).numel() > 0  # the intact blob still reads


def test_the_index_holds_each_blobs_checksum(tmp_path):
    store = _store(tmp_path)
    for name, task in (SHARED_BLOB, TASK_BLOB):
        info = store.info(name, task)
        assert info.blake2b == checksum(_file(store, name, task).read_bytes())
        assert len(info.blake2b) == 32  # 16-byte BLAKE2b, as phase checkpoints


def test_a_store_written_before_checksums_still_reads_and_its_sizes_are_checked(tmp_path):
    """An index without ``blake2b`` (stores written before it) reads; only a changed size is
    found there (docs/reproducibility.md says what such a store lacks)."""
    store = _store(tmp_path)
    index_path = store.root / "index.json"
    index = json.loads(index_path.read_text())
    for blobs in index.values():
        for info in blobs.values():
            info.pop("blake2b")
    index_path.write_text(json.dumps(index))
    old = ArtifactStore(store.root)
    assert torch.equal(old.get_tensor("indices", 1), torch.arange(32, dtype=torch.int16))
    old.verify()
    _truncate(_file(old, "indices", 1))
    with pytest.raises(StoreIntegrityError, match="truncated"):
        old.get_tensor("indices", 1)


def test_a_run_resumed_onto_a_damaged_store_stops_with_exit_2(tmp_path, capsys):
    """A task in the store but not yet evaluated is evaluated on resume, from the store: a
    flipped byte in the stored task is exit 2 naming it, not a new accuracy."""
    argv = ["--method", "finetune", "--benchmark", "synthetic", "--protocol", "smoke",
            "--tasks", "2", "--seeds", "7", "--no-progress", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    run_dir = next(tmp_path.glob("synthetic-finetune-*"))
    rows = pd.read_csv(run_dir / "rows.csv")
    rows[rows.after_task == 0].to_csv(run_dir / "rows.csv", index=False)  # as if killed
    store = ArtifactStore(run_dir / "artifacts", readonly=True)
    path = _file(store, store.names(1)[0], 1)
    _flip(path)
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(run_dir) in err and "task 1" in err and str(path) in err
    assert "Traceback" not in err
