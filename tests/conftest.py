"""Shared fixtures, and a summary of speed ratios from pytest-benchmark groups.

A benchmark test sets ``benchmark.extra_info["role"] = "baseline"`` for the reference
(e.g. the plain model's step); every other benchmark in the same group is reported as a
ratio of mean times to that baseline at the end of the run, together with any
``extra_info["peak_ratio"]`` the test measured. A test that times its own baseline in paired
rounds reports ``extra_info["paired_ratio"]`` instead, printed as is.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch


def pytest_configure(config) -> None:
    """Derived-value caches (``analysis.compressed``) go to a folder of this session, not the
    user's ``~/.cache``: tests neither read stale sizes nor leave files behind."""
    os.environ["NWS_CACHE_DIR"] = tempfile.mkdtemp(prefix="nws-test-cache-")


def pytest_unconfigure(config) -> None:
    shutil.rmtree(os.environ.get("NWS_CACHE_DIR", ""), ignore_errors=True)


def pytest_collection_modifyitems(config, items) -> None:
    """``@pytest.mark.cuda`` tests are skipped, with the reason shown, without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker cuda); none is visible")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch) -> None:
    """Every test means the CPU run unless marked ``cuda``: ``--device auto`` (the harness's
    and CLI's default, also in the processes a test starts) resolves to the CPU through
    ``$NWS_DEVICE``, so ``tox`` passes the same on a machine where a GPU is visible."""
    from benchmarks.core.device_policy import DEVICE_ENV

    if "cuda" not in request.keywords:
        monkeypatch.setenv(DEVICE_ENV, "cpu")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    session = getattr(config, "_benchmarksession", None)
    benches = getattr(session, "benchmarks", None) or []
    groups: dict[str, list] = {}
    for b in benches:
        groups.setdefault(b.group or "", []).append(b)
    lines = []
    for group, items in sorted(groups.items()):
        for b in items:  # tests that time their own baseline in paired rounds
            info = dict(b.extra_info)
            if "paired_ratio" in info:
                ratio, plain = info.pop("paired_ratio"), info.pop("plain_median_ms", None)
                lines.append(f"{group}: {b.name} = {ratio:.3f}x the paired plain step "
                             f"({plain} ms)" + (f"  {info}" if info else ""))
        base = next((b for b in items if b.extra_info.get("role") == "baseline"), None)
        if base is None or not base.stats:
            continue
        for b in items:
            if b is base or not b.stats:
                continue
            ratio = b.stats.mean / base.stats.mean
            extra = {k: v for k, v in b.extra_info.items() if k != "role"}
            lines.append(f"{group}: {b.name} / {base.name} = {ratio:.3f}x time"
                         + (f"  {extra}" if extra else ""))
    if lines:
        terminalreporter.section("speed ratios (same run)")
        for line in lines:
            terminalreporter.write_line(line)
