"""One writer per run folder: an exclusive ``fcntl.flock`` on ``<run folder>/run.lock``.

Opening an :class:`~benchmarks.core.store.ArtifactStore` removes files its index does not name and
``rows.csv`` is rewritten read-modify-write, so two processes on one run (a duplicated array
task, a requeued job while the old one is still dying, a user launching again) would delete
each other's writes. :class:`RunLock` is held for a run's whole life; a second process stops at
once with :class:`RunLockedError` naming the holder (host, pid, start time, written into the
lock file) and touches nothing.

A stale lock cannot happen on a local file system: the kernel releases a ``flock`` when its
holder dies (also on SIGKILL), so the next run simply takes it over; the holder lines in the
file are then just overwritten. The file itself is never deleted (deleting it would let two
processes lock two different files of one name).

Network file systems: whether ``flock`` is seen across machines depends on the mount (NFSv4
and Linux NFS clients since 2.6.12 emulate it with POSIX byte-range locks, which work across
clients; ``nolock`` mounts and some FUSE file systems lock per machine only). On a cluster,
keep result folders on a file system whose locks reach every node (Lustre needs
``-o flock``; GPFS and NFSv4 do it by default).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from nws.atomic import storage_error

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock."""


def _holder_text() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def read_holder(run_dir: str | Path) -> dict[str, Any]:
    """What the (last) holder wrote into the lock file; {} when absent or unreadable."""
    try:
        return json.loads((Path(run_dir) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def is_locked(run_dir: str | Path) -> bool:
    """Whether a live process holds the run folder's lock (probes with a shared lock, released
    at once: a run starting in that instant would see it held and stop, so call it from status
    tools only)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the probe's lock
    return False


class RunLock:
    """``with RunLock(run_dir):`` holds the run folder exclusively (see the module docs)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock now or raise :class:`RunLockedError` (never waits)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # a read-only or full disk: name the file, say what to do
            raise storage_error(self.path, err, "cannot lock the run folder at") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_holder(self.dir)
            raise RunLockedError(
                f"{self.dir} is in use by another process (host {holder.get('host', '?')}, "
                f"pid {holder.get('pid', '?')}, since {holder.get('started', '?')}); this one "
                f"stops and changes nothing. Wait for it to finish, or stop that process first"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_text().encode(), 0)
            os.fsync(fd)
        except OSError as err:
            os.close(fd)  # closing releases the lock
            raise storage_error(self.path, err, "cannot write the holder into") from err
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
