"""Metric formulas on hand-computed cases; KUR and layer sparsity on a hand-made index set."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.metrics import (
    accuracy_matrix,
    entropy_bits,
    forgetting,
    kernel_utilization,
    layer_sparsity,
    layer_stats,
    paired_comparison,
    per_seed,
    summarize,
    weighted_entropy_bits,
)


def _rows(matrix: list[list[float]], method: str = "m", seed: int = 1) -> pd.DataFrame:
    """Accuracy rows of one run from a lower-triangular R[i][j]."""
    rows = [{"run_id": f"{method}-{seed}", "benchmark": "b", "method": method, "arch": "a",
             "protocol": "p", "seed": seed, "task": j, "after_task": i, "metric": "accuracy",
             "value": v} for i, row in enumerate(matrix) for j, v in enumerate(row)]
    return pd.DataFrame(rows)


def test_accuracy_matrix_and_forgetting() -> None:
    r = [[0.9], [0.7, 0.8], [0.6, 0.8, 0.5]]
    m = accuracy_matrix(_rows(r))
    assert m.loc[2, 0] == 0.6 and math.isnan(m.loc[0, 1])
    f = forgetting(m)
    # task 0: best 0.9 before the end, 0.6 at the end; task 1: 0.8 -> 0.8
    assert f.to_dict() == pytest.approx({0: 0.3, 1: 0.0})
    s = per_seed(_rows(r)).iloc[0]
    assert s.avg_accuracy == pytest.approx((0.6 + 0.8 + 0.5) / 3)
    assert s.avg_forgetting == pytest.approx(0.15) and s.tasks == 3


def test_no_forgetting_is_measured_not_assumed() -> None:
    r = [[0.9], [0.9, 0.8], [0.9, 0.8, 0.7]]
    assert forgetting(accuracy_matrix(_rows(r))).abs().max() == 0


def test_summarize_over_seeds() -> None:
    s = summarize([0.70, 0.72, 0.74])
    assert s.mean == pytest.approx(0.72) and s.std == pytest.approx(0.02) and s.n == 3
    # t(0.975, 2) = 4.302653; half width = 4.302653 * 0.02 / sqrt(3)
    half = 4.302653 * 0.02 / math.sqrt(3)
    assert (s.ci_low, s.ci_high) == pytest.approx((0.72 - half, 0.72 + half), abs=1e-6)
    one = summarize([0.5])
    assert one.mean == 0.5 and math.isnan(one.std) and math.isnan(one.ci_low)


def test_paired_comparison() -> None:
    rows = pd.concat([
        _rows([[0.80]], "nws", 1), _rows([[0.84]], "nws", 2), _rows([[0.82]], "nws", 3),
        _rows([[0.70]], "ksm", 1), _rows([[0.75]], "ksm", 2), _rows([[0.71]], "ksm", 3),
        _rows([[0.50]], "aqd", 9),  # no shared seed: no pair
    ])
    p = paired_comparison(per_seed(rows)).set_index("baseline")
    diffs = np.array([0.10, 0.09, 0.11])
    assert p.loc["ksm", "mean_diff"] == pytest.approx(diffs.mean())
    assert p.loc["ksm", "seeds"] == 3
    t = diffs.mean() / (diffs.std(ddof=1) / math.sqrt(3))  # paired t statistic, 2 dof
    assert t == pytest.approx(17.320508, rel=1e-6)
    assert p.loc["ksm", "p_value"] == pytest.approx(0.0033167, rel=1e-3)
    assert p.loc["aqd", "seeds"] == 0


def test_kur_and_layer_sparsity_by_hand() -> None:
    # d = 16 kernels, sqrt(d) = 4. Counts: index 0 x7, 1 x4, 2 x3, 3 x1, 4 x1 -> 5 unique
    idx = np.array([0] * 7 + [1] * 4 + [2] * 3 + [3, 4])
    assert kernel_utilization(idx, pool_size=8) == 5 / 8
    # strict (paper Eq. 5): counts < 4 are 3, 1, 1 -> 5/16; the authors' <= adds 4 -> 9/16
    assert layer_sparsity(idx) == 5 / 16
    assert layer_sparsity(idx, inclusive=True) == 9 / 16
    # d = 12 (not a square): both agree
    idx12 = np.array([0] * 6 + [1] * 3 + [2] * 3)
    assert layer_sparsity(idx12) == layer_sparsity(idx12, inclusive=True) == 6 / 12


def test_entropy_and_layer_stats() -> None:
    assert entropy_bits(np.array([0, 1, 2, 3])) == pytest.approx(2.0)
    assert entropy_bits(np.array([5, 5, 5])) == 0.0
    stats = layer_stats({"a": np.array([0, 1, 2, 3]), "b": np.array([7] * 12)}, pool_size=4)
    assert list(stats.layer) == ["a", "b"] and list(stats.kur) == [1.0, 0.25]
    # (4 * 2 bits + 12 * 0 bits) / 16 indices
    assert weighted_entropy_bits(stats) == pytest.approx(0.5)
