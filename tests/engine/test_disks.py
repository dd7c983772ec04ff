"""Disks (issue 21, item 8): a read-only file system and a full disk.

A finished run reports itself done without its lock (nothing to write); any write that
fails names the file and what to do (CLI exit 2) and leaves no partial temporary file. Every
writer goes through :mod:`nws.atomic`, so a write failing at any point of a run is
checked here (the run folder's JSON files, artifact blobs and index, phase checkpoints and
their digests, rows.csv, the lock's holder line).
"""

from __future__ import annotations

import errno
import os
import types
from pathlib import Path

import pytest

from benchmarks.core import lock
from benchmarks.core.results import ResultsStore, load_rows
from benchmarks.exec import run as cli
from nws import atomic

RUN = ["--method", "finetune", "--benchmark", "synthetic", "--protocol", "smoke", "--tasks", "2",
       "--seeds", "3", "--no-progress", "--bench-opt", "size=16", "--bench-opt", "n_train=8",
       "--bench-opt", "n_test=4"]


def _leftovers(folder: Path) -> list[Path]:
    """Temporary files of the atomic writer (hidden ``.tmp`` names) under ``folder``."""
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


def _failing_fsync(monkeypatch, at: int, code: int = errno.ENOSPC) -> list[int]:
    """``os.fsync`` raising ``OSError(code)`` on its ``at``-th call (1-based) and after."""
    calls, real = [], os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) >= at:
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_a_full_disk_names_the_file_and_leaves_nothing_partial(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path / "run")
    _failing_fsync(monkeypatch, at=1)
    with pytest.raises(atomic.StorageError, match="disk is full") as err:
        store.append([{"task": 0, "metric": "accuracy", "value": 0.5}])
    assert str(tmp_path / "run" / "rows.csv") in str(err.value)
    assert err.value.errno == errno.ENOSPC and not (tmp_path / "run" / "rows.csv").exists()
    assert _leftovers(tmp_path) == []
    with pytest.raises(atomic.StorageError, match=r"x\.pt"), \
            atomic.atomic_path(tmp_path / "x.pt") as t:
        t.write_bytes(b"half")  # a writer given a path (torch.save, savefig, np.memmap)
    assert _leftovers(tmp_path) == [] and not (tmp_path / "x.pt").exists()


def test_a_run_whose_disk_fills_at_any_write_exits_2_naming_the_file(tmp_path, monkeypatch,
                                                                      capsys):
    """The run once to count its fsyncs (one per atomic write, one for the lock), then with
    the disk full at every 3rd of them: exit 2, the file named, nothing partial left."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    calls = _failing_fsync(monkeypatch, at=10**9)
    assert cli.main([*RUN, "--out", str(tmp_path / "whole")]) == 0
    total = len(calls)
    assert total >= 12  # lock, config, env, blobs, index, checkpoint, digest, rows per task
    for at in range(1, total + 1, 3):
        out = tmp_path / f"full{at}"
        _failing_fsync(monkeypatch, at=at)
        capsys.readouterr()
        assert cli.main([*RUN, "--out", str(out)]) == 2, at
        message = capsys.readouterr().err
        assert "disk is full" in message and str(out) in message, (at, message)
        assert "Traceback" not in message
        assert _leftovers(out) == [], at


def test_a_finished_run_on_a_read_only_disk_reports_done_without_its_lock(tmp_path,
                                                                           monkeypatch,
                                                                           capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli.main([*RUN, "--out", str(tmp_path)]) == 0
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    # the lock file and every atomic write now fail as on a read-only mount
    monkeypatch.setattr(lock, "os", types.SimpleNamespace(**{**vars(os), "open": read_only}))
    monkeypatch.setattr(atomic, "temporary_path", read_only)
    capsys.readouterr()
    assert cli.main([*RUN, "--out", str(tmp_path)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert len(load_rows(tmp_path).query("metric == 'accuracy'")) == 3

    # a run that still has work there: exit 2 naming the lock file and what to do
    assert cli.main([*RUN, "--seeds", "4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "run.lock" in err and "read-only" in err and "Traceback" not in err

    # the same finished run as a launcher's job: done, its record not writable is a warning
    from benchmarks.exec.launch import plan_jobs
    from benchmarks.exec.launch.job import run_job

    monkeypatch.setattr(atomic, "temporary_path", lambda path: path.with_name(".t.tmp"))
    monkeypatch.setattr(os, "fsync", read_only)
    parser = cli.parser()
    (job,) = plan_jobs(parser.parse_args([*RUN, "--out", str(tmp_path)]))
    assert run_job(job, tmp_path) == 0
    err = capsys.readouterr().err
    assert "job record" in err and "read-only" in err and _leftovers(tmp_path) == []


def test_tables_on_a_full_disk_exit_2_naming_the_file(tmp_path, monkeypatch, capsys):
    import pandas as pd

    from analysis import tables
    from benchmarks.core.results import COLUMNS

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    base = {"run_id": "r", "benchmark": "synthetic", "method": "finetune", "arch": "resnet18",
            "protocol": "smoke", "seed": 1, "synthetic": True}
    pd.DataFrame([base | {"task": 0, "task_name": "t0", "after_task": 0, "metric": "accuracy",
                          "value": 0.5}], columns=COLUMNS).to_csv(run / "rows.csv", index=False)
    _failing_fsync(monkeypatch, at=1)
    out = tmp_path / "tables"
    assert tables.main(["--results", str(tmp_path / "runs"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and str(out) in err and _leftovers(out) == []
