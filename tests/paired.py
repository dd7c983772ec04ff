"""Paired rounds for pytest-benchmark: a step timed against its baseline on a drifting machine.

pytest-benchmark times ``measured``; ``baseline`` runs in each round's untimed setup, right
before it, and is timed there. Load drift on a shared machine then hits both alike (timed in
separate blocks, the same plain ResNet-34 step moved by up to 50% between blocks here).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def paired(benchmark, measured: Callable[[], Any], baseline: Callable[[], Any], *,
           rounds: int, warmup: int) -> Any:
    """Run both in paired rounds; ``extra_info`` gets the baseline's median (ms) and
    ``paired_ratio`` = median measured / median baseline. Returns ``measured``'s result."""
    baseline_times: list[float] = []

    def setup() -> None:
        start = time.perf_counter()
        baseline()
        baseline_times.append(time.perf_counter() - start)

    result = benchmark.pedantic(measured, setup=setup, rounds=rounds, warmup_rounds=warmup)
    median = statistics.median(baseline_times[-rounds:])
    benchmark.extra_info["plain_median_ms"] = round(median * 1e3, 1)
    benchmark.extra_info["paired_ratio"] = round(benchmark.stats.stats.median / median, 3)
    return result
