"""Figures 3 and 4, memory growth and accuracy matrices, as PNG and PDF at column width.

    python -m analysis.figures --results results/runs [--benchmark NAME] [--protocol P] [--out DIR]

For every (benchmark, protocol) with runs:

- ``fig3_<b>_<p>``: task-wise accuracy of every method (mean over seeds, band = min-max over
  seeds, dots = single seeds): the paper's Figure 3 (Split-CIFAR-100).
- ``fig4_<b>_<p>``: two heatmaps, layers x tasks, of NWS's kernel utilisation ratio and layer
  sparsity (Eq. 5, strict <), mean over seeds: the paper's Figure 4 (CUB-to-Sketches). Needs
  NWS runs with their artifact stores.
- ``memory_growth_<b>``: total MiB against tasks learned, stored and paper convention
  (analytic), with the stored bytes measured in each run as markers; the suite's extensions
  (``nws-delta``: NWS with its indices stored as deltas) as dashed measured lines.
- ``accuracy_matrix_<b>_<p>``: R[i][j] per method (mean over seeds).

A series (a line, a heatmap, a legend entry) is one experiment: runs with other settings than
their method's defaults are their own series, labelled by what differs (``nws (beta=0.1)``;
:mod:`analysis.identity`); Figure 4 is drawn once per NWS experiment (``fig4_<b>_<p>`` for
NWS's defaults, ``fig4_<b>_<p>_<label>`` for the others). Each title names the benchmark,
protocol and seeds; what cannot be drawn is reported.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from analysis.memory import growth, memory_report, mib
from analysis.metrics import accuracy_matrix, final_accuracies, layer_stats
from analysis.runs import (
    LeftOut,
    Run,
    display_label,
    is_default,
    load_runs,
    pool_size,
    results_parser,
    select,
    task_streams,
    variants_beside,
)
from nws.atomic import StorageError, atomic_path, atomic_write_text

COLUMN_WIDTH = 3.5  # inches: one column of a two-column paper
FORMATS = ("png", "pdf")


def _style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=0.8,
                  rc={"figure.dpi": 200, "savefig.bbox": "tight", "axes.titlesize": 7})


def _save(fig: plt.Figure, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.{ext}" for ext in FORMATS]
    for p in paths:
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format=p.suffix[1:])
    plt.close(fig)
    return paths


def _describe(runs: list[Run]) -> str:
    b, p = runs[0].benchmark, runs[0].protocol
    seeds = ", ".join(map(str, sorted({r.seed for r in runs})))
    return f"{b}, protocol {p}, seeds {seeds}"


def task_accuracy_frame(runs: list[Run]) -> pd.DataFrame:
    """Long table: method, seed, task (1-based), accuracy (%) after the last task learned."""
    parts = [pd.DataFrame({"method": r.method, "seed": r.seed, "task": acc.index + 1,
                           "accuracy": 100 * acc.values})
             for r in runs for acc in [final_accuracies(r.rows)] if len(acc)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def figure3(runs: list[Run], out: Path, name: str) -> list[Path]:
    df = task_accuracy_frame(runs)
    if df.empty:
        return []
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.4))
    sns.lineplot(df, x="task", y="accuracy", hue="method", errorbar=("pi", 100), marker="o",
                 markersize=3, linewidth=1, ax=ax)
    sns.stripplot(df, x="task", y="accuracy", hue="method", native_scale=True, size=1.5,
                  alpha=0.5, legend=False, ax=ax, jitter=0.1)
    ax.set(xlabel="task", ylabel="accuracy (%)",
           title=f"Task-wise accuracy: {_describe(runs)}\n(line: mean, band: min-max over seeds)")
    ax.legend(fontsize=6, ncols=3, loc="lower left")
    return _save(fig, out, name)


def _nws_runs(runs: list[Run]) -> list[Run]:
    """NWS runs under any codec (nws-delta's stores hold the same indices)."""
    return [r for r in runs if r.registered_method == "nws"]


def kernel_frame(runs: list[Run]) -> pd.DataFrame:
    """KUR and layer sparsity per (seed, task, layer) of every NWS run with a store."""
    parts = []
    for r in {r.seed: r for r in reversed(_nws_runs(runs))}.values():  # one per seed
        streams = task_streams(r, "task_indices")
        n = pool_size(r) if streams else 0
        for t, layers in streams.items():
            parts.append(layer_stats(layers, n).assign(seed=r.seed, task=t + 1,
                                                       order=range(len(layers))))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label).strip("_")


def figures4(runs: list[Run], out: Path, name: str) -> list[Path]:
    """Figure 4 of each NWS experiment (one label each, never mixing settings)."""
    files = []
    for label in dict.fromkeys(r.method for r in _nws_runs(runs)):
        own = select(runs, method=label)
        files += figure4(own, out, name if label == "nws" else f"{name}_{_slug(label)}",
                         "" if label == "nws" else f"{label}, ")
    return files


def figure4(runs: list[Run], out: Path, name: str, what: str = "") -> list[Path]:
    df = kernel_frame(runs)
    if df.empty:
        return []
    atomic_write_text(out / f"{name}.csv", df.to_csv(index=False))  # numbers of the heatmaps
    mean = df.groupby(["order", "layer", "task"], as_index=False)[["kur", "layer_sparsity"]].mean()
    layers = mean.drop_duplicates("order").sort_values("order")
    labels = [f"{i + 1}" for i in range(len(layers))]
    height = max(2.0, 0.12 * len(layers) + 0.8)
    fig, axes = plt.subplots(1, 2, figsize=(COLUMN_WIDTH, height), sharey=True)
    for ax, col, title in zip(axes, ("kur", "layer_sparsity"), ("(a) KUR", "(b) layer sparsity"),
                              strict=True):
        grid = mean.pivot(index="order", columns="task", values=col).sort_index()
        sns.heatmap(grid, ax=ax, cmap="viridis", vmin=0, vmax=1, cbar_kws={"shrink": 0.8},
                    yticklabels=labels, annot=len(grid.columns) <= 5, fmt=".2f",
                    annot_kws={"fontsize": 4})
        ax.set(title=title, xlabel="task", ylabel="layer" if col == "kur" else "")
        ax.tick_params(labelsize=5)
        ax.collections[0].colorbar.ax.tick_params(labelsize=5)
        ax.grid(False)
    seeds = sorted(df.seed.unique())
    fig.suptitle(f"NWS kernels: {what}{_describe(_nws_runs(runs))} "
                 f"(mean of {len(seeds)} seed(s))", fontsize=7)
    return _save(fig, out, name)


def memory_growth(runs: list[Run], benchmark: str, arch: str, out: Path, name: str,
                  results: Path) -> list[Path]:
    """Lines: each method's analytic memory (stored, paper convention); x: the stored bytes
    measured in runs. Variants (the suite's extensions, e.g. nws-delta) have no analytic
    formula: their measured stores, mean over seeds, are drawn dashed in the stored panel."""
    try:
        report = memory_report(benchmark, arch, results=results)
    except KeyError:
        return []
    rows = []
    for m, r in report.items():
        for conv, b in (("stored", r.stored), ("paper convention", r.paper_convention)):
            for t, v in enumerate(growth(b) or [], start=1):
                rows.append({"method": m, "convention": conv, "tasks": t, "MiB": v})
    df = pd.DataFrame(rows)
    if df.empty:
        return []
    measured = pd.DataFrame([{"method": r.method, "tasks": int(row.after_task) + 1,
                              "MiB": mib(row.value)}
                             for r in select(runs, arch=arch)
                             for row in r.rows[r.rows.metric == "store_bytes"].itertuples()],
                            columns=["method", "tasks", "MiB"])
    methods = variants_beside(list(dict.fromkeys([*df.method, *measured.method])))
    palette = dict(zip(methods, sns.color_palette(n_colors=len(methods)), strict=True))
    fig, axes = plt.subplots(1, 2, figsize=(COLUMN_WIDTH * 1.4, 2.2), sharey=True)
    for ax, conv in zip(axes, ("stored", "paper convention"), strict=True):
        sns.lineplot(df[df.convention == conv], x="tasks", y="MiB", hue="method", ax=ax,
                     palette=palette, linewidth=1, legend=False)
        ax.set(yscale="log", title=f"{conv} (analytic)", xlabel="tasks learned")
    variants = measured[~measured.method.map(is_default).astype(bool)]
    if len(variants):
        sns.lineplot(variants.groupby(["method", "tasks"], as_index=False).MiB.mean(),
                     x="tasks", y="MiB", hue="method", palette=palette, ax=axes[0],
                     linewidth=1, linestyle="--", legend=False)
    if len(measured):
        sns.scatterplot(measured, x="tasks", y="MiB", hue="method", palette=palette,
                        ax=axes[0], marker="x", s=12, legend=False)
    shown = [m for m in methods if m in set(df.method) | set(variants.method)]
    fig.legend([Line2D([], [], color=palette[m], linewidth=1,
                       linestyle="-" if is_default(m) else "--") for m in shown],
               [display_label(m, short=True) for m in shown], fontsize=5,
               loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"Memory growth, {benchmark}, {arch} (x: measured in runs; dashed: the "
                 "suite's extensions and other settings, measured)", fontsize=7, y=1.04)
    return _save(fig, out, name)


def accuracy_matrices(runs: list[Run], out: Path, name: str) -> list[Path]:
    methods = list(dict.fromkeys(r.method for r in runs))
    mats = {m: pd.concat([accuracy_matrix(r.rows) for r in select(runs, method=m)])
            .groupby(level=0).mean() * 100 for m in methods}
    mats = {m: x for m, x in mats.items() if not x.empty}
    if not mats:
        return []
    cols = min(3, len(mats))
    nrows = -(-len(mats) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(COLUMN_WIDTH * 1.4, 1.6 * nrows + 0.4),
                             squeeze=False)
    for ax, (m, mat) in zip(axes.flat, mats.items(), strict=False):
        mat = mat.rename(index=lambda i: i + 1, columns=lambda j: j + 1)
        sns.heatmap(mat, ax=ax, vmin=0, vmax=100, cmap="magma", cbar=False,
                    annot=mat.shape[1] <= 6, fmt=".0f", annot_kws={"fontsize": 4})
        ax.set(title=m, xlabel="tested on task", ylabel="after task")
        ax.tick_params(labelsize=5)
        ax.grid(False)
    for ax in list(axes.flat)[len(mats):]:
        ax.axis("off")
    fig.suptitle(f"Accuracy matrix R[i][j] (%), {_describe(runs)}", fontsize=7)
    fig.tight_layout()
    return _save(fig, out, name)


def build_figures(results: str | Path, out: str | Path, benchmark: str | None = None,
                  protocol: str | None = None) -> tuple[list[Path], list[str]]:
    """Draw every figure; returns the files written and messages about what was not drawn."""
    _style()
    out, results = Path(out), Path(results)
    left_out: list[LeftOut] = []
    runs = select(load_runs(results, left_out), benchmark=benchmark, protocol=protocol)
    skipped = [f"{x.dir}: {x.line()}" for x in left_out]
    if not runs:
        return [], [*skipped, f"no runs{' for benchmark ' + benchmark if benchmark else ''} "
                              f"under {results}: nothing to show"]
    files, messages = [], skipped
    for b in sorted({r.benchmark for r in runs}):
        b_runs = select(runs, benchmark=b)
        for arch in sorted({r.arch for r in b_runs}):
            files += memory_growth(b_runs, b, arch, out, f"memory_growth_{b}_{arch}", results)
        for p in sorted({r.protocol for r in b_runs}):
            group, tag = select(b_runs, protocol=p), f"{b}_{p}"
            files += figure3(group, out, f"fig3_{tag}")
            files += accuracy_matrices(group, out, f"accuracy_matrix_{tag}")
            fig4 = figures4(group, out, f"fig4_{tag}")
            if not fig4:
                messages.append(f"fig4_{tag}: no NWS run with a readable artifact store "
                                f"({len(_nws_runs(group))} NWS run(s)): not drawn")
            files += fig4
    return files, messages


def main(argv: list[str] | None = None) -> int:
    args = results_parser("python -m analysis.figures", __doc__,
                          "results/figures").parse_args(argv)
    try:
        files, messages = build_figures(args.results, args.out, args.benchmark, args.protocol)
    except StorageError as err:  # a full or read-only disk: the file and what to do
        print(f"error: {err}", file=sys.stderr)
        return 2
    for m in messages:
        print(m)
    for f in files:
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
