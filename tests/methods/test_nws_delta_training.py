"""The delta codec on a real NWS run: the same seed with codec=fixed and codec=delta learns
the same indices and accuracies (deterministic), and delta stores each task after the first
in <= 30% of fixed's index bytes (split_digits, quick protocol, 3 tasks at the tests' 16x16).

Measured 2026-12-03 (issue 21: margins on any CPU), seed 1993, 1 thread: delta / fixed of
tasks 1 and 2 = 0.125, 0.126 (ATEN_CPU_CAPABILITY=avx2) and 0.117, 0.141 (default)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmarks.core.store import ArtifactStore
from benchmarks.engine.harness import RunConfig, run
from benchmarks.methods.nws_method import NWSMethod
from tests.fakes import DIGITS_TEST_SIZE

TASKS = 3
OPTIONS = {"kmeans_iters": 6, "kmeans_points": 8192}  # smaller k-means fits, as test_nws_method


def _learn(out, codec: str):
    folder = run(RunConfig(method="nws", benchmark="split_digits", protocol="quick",
                           pretrained="none", num_tasks=TASKS, out=str(out), progress=False,
                           deterministic=True, method_options=OPTIONS | {"codec": codec},
                           benchmark_options={"size": DIGITS_TEST_SIZE}))
    return pd.read_csv(folder / "rows.csv"), ArtifactStore(folder / "artifacts", readonly=True)


@pytest.mark.slow
def test_delta_codec_is_lossless_and_stores_later_tasks_in_under_30_percent(tmp_path) -> None:
    fixed_rows, fixed = _learn(tmp_path, "fixed")
    delta_rows, delta = _learn(tmp_path, "delta")
    acc = [r[r.metric == "accuracy"].set_index(["after_task", "task"]).value
           for r in (fixed_rows, delta_rows)]
    assert len(acc[0]) == TASKS * (TASKS + 1) // 2 and acc[0].equals(acc[1])
    for t in range(TASKS):
        a, b = NWSMethod.task_indices(fixed, t), NWSMethod.task_indices(delta, t)
        assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
        assert delta.get_bytes("bn", t) == fixed.get_bytes("bn", t)
    assert delta.info("indices", 0).nbytes == fixed.info("indices", 0).nbytes
    m = delta_rows[delta_rows.task == delta_rows.after_task].pivot(
        index="task", columns="metric", values="value")
    for t in range(1, TASKS):
        ratio = delta.info("indices", t).nbytes / fixed.info("indices", t).nbytes
        assert ratio <= 0.30, (t, ratio, m.loc[t, "changed_fraction"])
        assert m.loc[t, "delta_entropy_bits"] <= m.loc[t, "bits_per_index"] < (
            m.loc[t, "delta_entropy_bits"] + 0.05)
    print(m[["changed_fraction", "bits_per_index", "delta_entropy_bits"]].to_string())
