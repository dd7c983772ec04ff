"""Artifact store: exact byte accounting, atomic transactions, round trips."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.core.store import ArtifactStore


def test_tensors_round_trip_and_bytes_are_the_payload(tmp_path):
    store = ArtifactStore(tmp_path)
    a = torch.randn(3, 4)
    b = torch.arange(10, dtype=torch.int16)
    with store.transaction() as tx:
        tx.put_tensor("a", a, task=0)
        tx.put_tensors("bn", {"w": a, "i": b}, task=0)
        tx.put("blob", b"\x01\x02\x03", task=None, codec="test")
    again = ArtifactStore(tmp_path)  # reopened from disk
    assert torch.equal(again.get_tensor("a", 0), a)
    got = again.get_tensors("bn", 0)
    assert torch.equal(got["w"], a) and torch.equal(got["i"], b) and got["i"].dtype == torch.int16
    assert again.get_bytes("blob") == b"\x01\x02\x03"
    assert again.nbytes(0) == 12 * 4 + 12 * 4 + 10 * 2
    assert again.nbytes(None) == 3
    assert again.total_bytes() == 12 * 4 + 12 * 4 + 20 + 3
    assert again.tasks() == [0] and again.names(0) == ["a", "bn"]
    files = sum(p.stat().st_size for p in tmp_path.glob("*/*.bin"))
    assert files == again.total_bytes()  # the payload is exactly what is on disk


def test_a_failed_transaction_leaves_the_store_as_it_was(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.transaction() as tx:
        tx.put("x", b"old", task=None)
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.put("x", b"new!", task=None)
        tx.put("y", b"task", task=1)
        raise RuntimeError("killed mid-save")
    again = ArtifactStore(tmp_path)
    assert again.get_bytes("x") == b"old" and again.tasks() == []
    assert len(list(tmp_path.glob("*/*.bin"))) == 1  # the aborted files are gone


def test_files_no_index_names_are_cleaned_on_open(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.transaction() as tx:
        tx.put("x", b"kept", task=0)
    stray = tmp_path / "task_000" / "deadbeef.bin"  # as left by a kill before the commit
    stray.write_bytes(b"orphan")
    ArtifactStore(tmp_path)
    assert not stray.exists()
    assert ArtifactStore(tmp_path).get_bytes("x", 0) == b"kept"


def test_rewriting_a_task_replaces_it_whole_and_shared_blobs_update(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.transaction() as tx:
        tx.put("a", b"1", task=0)
        tx.put("b", b"22", task=0)
        tx.put("s", b"v1", task=None)
        tx.set_task_meta(0, {"train_seconds": 1.5})
    with store.transaction() as tx:
        tx.put("a", b"333", task=0)
        tx.put("s", b"v2!", task=None)
    assert store.names(0) == ["a"] and store.get_bytes("s") == b"v2!"
    assert store.total_bytes() == 6
    assert store.task_meta(0) == {}
    index = json.loads((tmp_path / "index.json").read_text())
    assert set(index) == {"shared", "task_000"}


def test_a_readonly_store_neither_cleans_nor_writes(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.transaction() as tx:
        tx.put("x", b"kept", task=0)
    pending = tmp_path / "task_001" / "0123456789abcdef.bin"  # another process mid-commit
    pending.parent.mkdir()
    pending.write_bytes(b"pending")
    reader = ArtifactStore(tmp_path, readonly=True)
    assert pending.exists() and reader.get_bytes("x", 0) == b"kept"
    with pytest.raises(PermissionError, match="read-only"):
        reader.transaction().__enter__()
    assert not (tmp_path / "nothing").exists()
    ArtifactStore(tmp_path / "nothing", readonly=True)
    assert not (tmp_path / "nothing").exists()


def test_missing_blob_error_lists_what_is_there(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.transaction() as tx:
        tx.put("indices", b"1", task=2)
    with pytest.raises(KeyError, match=r"no blob 'bn' in task 2; it holds \['indices'\]"):
        store.get_bytes("bn", 2)
