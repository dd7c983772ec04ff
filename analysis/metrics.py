"""Metrics, as pure functions of result rows and index arrays.

Accuracy is a fraction in [0, 1] here (rows.csv stores it so); tables print percent.

- Average accuracy (paper §5.2): the mean over tasks of each task's accuracy, evaluated
  from the store after the last task learned, per seed; then mean, sample std (ddof 1) and
  a 95% Student-t interval over seeds (:func:`summarize`).
- Accuracy matrix R[i][j]: accuracy on task j after learning task i (FACIL's layout).
- Forgetting of task j: max over i in [j, T-1) of R[i][j], minus R[T-1][j] (Chaudhry et
  al.), computed from the matrix; zero for these methods only if the matrix says so.
- KUR (paper §5.7): unique indices of a layer / pool size n.
- Layer sparsity (paper Eq. 5): sum of h_u / d over unique indices u with h_u **<** sqrt(d)
  (strict, as printed in the paper; the authors' code uses <=, available as
  ``inclusive=True``). The two differ only when d is a perfect square and a count equals
  sqrt(d), as in ResNet-18's 64x64, 128x128, 256x256 and 512x512 layers.
- Index entropy: the per-layer order-0 entropy of the indices, weighted by layer size, in
  bits per index: the bound for any coder that codes each layer's indices independently.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

# A run's columns in rows.csv; ``method`` holds the run's label once loaded by
# analysis.runs.load_runs, so grouping by these keys gathers one experiment's seeds
# (analysis.identity).
RUN_KEYS = ["benchmark", "method", "arch", "protocol"]

log = logging.getLogger(__name__)


# -- accuracy -------------------------------------------------------------------------


def accuracy_matrix(rows: pd.DataFrame) -> pd.DataFrame:
    """R[after_task][task] of one run (NaN where task > after_task)."""
    acc = rows[rows.metric == "accuracy"]
    return acc.pivot_table(index="after_task", columns="task", values="value", aggfunc="mean")


def final_accuracies(rows: pd.DataFrame) -> pd.Series:
    """Each task's accuracy after the last task the run learned (the paper's task-wise A_i)."""
    m = accuracy_matrix(rows)
    return m.iloc[-1].dropna() if len(m) else pd.Series(dtype=float)


def forgetting(matrix: pd.DataFrame) -> pd.Series:
    """Per task j < T-1: best earlier accuracy on j minus the final one."""
    if len(matrix) < 2:
        return pd.Series(dtype=float)
    final = matrix.iloc[-1]
    earlier = matrix.iloc[:-1]
    tasks = [j for j in matrix.columns if j < matrix.index[-1]]
    return pd.Series({j: earlier[j].max() - final[j] for j in tasks}, dtype=float)


def per_seed(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per run: keys, seed, tasks learned, average accuracy and forgetting."""
    out = []
    for (run_id, *_), g in rows.groupby(["run_id", *RUN_KEYS, "seed"], sort=True):
        m = accuracy_matrix(g)
        if m.empty:
            continue
        f = forgetting(m)
        first = g.iloc[0]
        complete = bool(g[g.metric == "accuracy"].value.notna().all())  # a NaN: no average
        out.append({**{k: first[k] for k in RUN_KEYS}, "run_id": run_id,
                    "seed": int(first.seed), "tasks": int(m.index[-1]) + 1,
                    "avg_accuracy": float(final_accuracies(g).mean()) if complete else math.nan,
                    "avg_forgetting": float(f.mean()) if len(f) else math.nan,
                    "max_forgetting": float(f.max()) if len(f) else math.nan})
    return pd.DataFrame(out, columns=[*RUN_KEYS, "run_id", "seed", "tasks", "avg_accuracy",
                                      "avg_forgetting", "max_forgetting"])


@dataclass(frozen=True)
class SeedSummary:
    mean: float
    std: float  # sample standard deviation (ddof 1); NaN for one seed
    ci_low: float  # 95% Student-t interval of the mean; NaN for one seed
    ci_high: float
    n: int


def summarize(values: Iterable[float], confidence: float = 0.95) -> SeedSummary:
    v = np.asarray(list(values), dtype=float)
    n = v.size
    if n == 0:
        return SeedSummary(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if n < 2:
        return SeedSummary(mean, math.nan, math.nan, math.nan, 1)
    std = float(v.std(ddof=1))
    if std == 0:
        return SeedSummary(mean, 0.0, mean, mean, n)
    lo, hi = stats.t.interval(confidence, n - 1, loc=mean, scale=std / math.sqrt(n))
    return SeedSummary(mean, std, float(lo), float(hi), n)


def _one_per_seed(df: pd.DataFrame, metric: str) -> pd.Series:
    """``metric`` by (seed, tasks); where a method has two rows of one seed (two runs of one
    experiment and seed), the first is kept with a warning, never an average."""
    dup = df.duplicated(["seed", "tasks"])
    if dup.any():
        log.warning("paired comparison: %s has %d duplicate seed row(s) (runs %s); the first "
                    "of each seed is used", df.method.iloc[0], int(dup.sum()),
                    ", ".join(map(str, df.run_id[dup])) if "run_id" in df else "?")
    return df[~dup].set_index(["seed", "tasks"])[metric]


def paired_comparison(seeds: pd.DataFrame, reference: str = "nws",
                      metric: str = "avg_accuracy") -> pd.DataFrame:
    """``reference`` minus each other method (label) on the seeds both have (same benchmark,
    arch, protocol, number of tasks learned): mean difference, 95% interval, paired t-test p.
    ``seeds`` should hold one row per (method, seed) (:func:`per_seed` of runs loaded by
    :func:`analysis.runs.load_runs`); a duplicate seed row is left out with a warning."""
    out = []
    for keys, g in seeds.groupby(["benchmark", "arch", "protocol"]):
        ref = _one_per_seed(g[g.method == reference], metric)
        for method, other in g[g.method != reference].groupby("method"):
            joined = pd.concat([ref, _one_per_seed(other, metric)], axis=1,
                               keys=["ref", "other"]).dropna()
            diff = joined.ref - joined.other
            s = summarize(diff)
            p = (float(stats.ttest_rel(joined.ref, joined.other).pvalue)
                 if s.n >= 2 and s.std > 0 else math.nan)
            out.append(dict(zip(["benchmark", "arch", "protocol"], keys, strict=True))
                       | {"reference": reference, "baseline": method, "seeds": s.n,
                          "mean_diff": s.mean, "ci_low": s.ci_low, "ci_high": s.ci_high,
                          "p_value": p})
    return pd.DataFrame(out)


# -- kernel analysis (paper §5.7) ----------------------------------------------------------


def kernel_utilization(indices: np.ndarray, pool_size: int) -> float:
    """KUR = unique selected entries / pool size."""
    return np.unique(np.asarray(indices)).size / pool_size


def layer_sparsity(indices: np.ndarray, inclusive: bool = False) -> float:
    """Eq. 5: the share of kernels whose index is selected fewer than sqrt(d) times."""
    idx = np.asarray(indices).ravel()
    d = idx.size
    _, counts = np.unique(idx, return_counts=True)
    threshold = math.sqrt(d)
    rare = counts <= threshold if inclusive else counts < threshold
    return float(counts[rare].sum() / d)


def entropy_bits(indices: np.ndarray) -> float:
    """Empirical order-0 entropy of one layer's indices, bits per index."""
    _, counts = np.unique(np.asarray(indices), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def layer_stats(task_indices: Mapping[str, np.ndarray], pool_size: int,
                inclusive: bool = False) -> pd.DataFrame:
    """KUR, layer sparsity, entropy and size of every layer of one task, in layer order."""
    return pd.DataFrame([
        {"layer": name, "kernels": int(np.asarray(idx).size),
         "kur": kernel_utilization(idx, pool_size),
         "layer_sparsity": layer_sparsity(idx, inclusive), "entropy_bits": entropy_bits(idx)}
        for name, idx in task_indices.items()])


def weighted_entropy_bits(layers: pd.DataFrame) -> float:
    """Bits per index of ideal per-layer order-0 coding (layer entropies weighted by size)."""
    return float((layers.entropy_bits * layers.kernels).sum() / layers.kernels.sum())
