"""A sweep's job records: ``<out>/_sweep/jobs/<key>.json`` (and a copy as the run folder's
``job.json``): which job ran where, its state and error. Written by a launcher's job
(:mod:`benchmarks.exec.launch.job`), read by :mod:`benchmarks.exec.status`: kept outside the
launch package so that reading status never imports a launcher."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.exec.sweep import Job, find_run_dir, sweep_dir
from nws.atomic import StorageError, atomic_write_text

__all__ = ["read_record", "record_path", "write_record"]


def record_path(out: str | Path, key: str) -> Path:
    return sweep_dir(out) / "jobs" / f"{key}.json"


def read_record(out: str | Path, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(record_path(out, key).read_text())
    except (OSError, ValueError):
        return None


def write_record(out: str | Path, job: Job, state: str, *, error: str | None = None,
                 log: str | None = None, launcher: dict[str, Any] | None = None,
                 started: float | None = None) -> dict[str, Any]:
    record = {"key": job.key, "method": job.method, "seed": job.seed, "state": state,
              "error": error, "log": log, "launcher": launcher or {},
              "host": socket.gethostname(), "pid": os.getpid(),
              "started": started, "ended": time.time(), "command": job.command_text()}
    text = json.dumps(record, indent=2, sort_keys=True)
    atomic_write_text(record_path(out, job.key), text)
    run_dir = find_run_dir(out, job)
    if run_dir is not None:
        atomic_write_text(run_dir / "job.json", text)
    return record


def _record(out: str | Path, job: Job, state: str, **kwargs: Any) -> None:
    """:func:`write_record`; a record that cannot be written (a full or read-only disk) is
    a warning naming the file: the run folder itself still says how far the run got."""
    try:
        write_record(out, job, state, **kwargs)
    except StorageError as err:
        print(f"warning: the job record of {job.key} ({state}) was not written: {err}",
              file=sys.stderr, flush=True)
