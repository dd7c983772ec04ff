"""Tables 1-3 from the results store, each as Markdown, CSV and LaTeX, the paper beside ours.

    python -m analysis.tables --results results/runs [--benchmark NAME] [--protocol P] [--out DIR]

For every (benchmark, protocol) with runs:

- ``table1_<b>_<p>``: average accuracy (mean ± std over seeds, 95% t-interval), forgetting,
  memory (stored, measured in the artifact store after the last task; paper convention,
  analytic for the whole benchmark; the paper's), one row per method, ResNet-18.
- ``table2_<b>_<p>``: task-wise accuracy, average and memory; a row "ours" and a row "paper".
- ``table3_<b>_<p>``: Finetune and NWS on every architecture with runs or paper values.
- ``pairs_<b>_<p>``: NWS minus each baseline over shared seeds (paired t-test).
- ``bits_<b>_<p>``: NWS bits per index (entropy, stored, int16 + lzma) per task, one seed.

Rows are experiments: runs are gathered by their settings but for the seed, and a run with
other settings than its method's defaults is its own row, labelled by what differs
(``nws (beta=0.1)``; :mod:`analysis.identity`); the paper's figures stand beside the default
rows only, and beside rows of the defaults on fewer tasks (``--tasks N``: marked partial).
Two runs of one experiment and seed are never averaged: the most complete is kept and a note
says so. A row whose seeds ran on different device types, or with and without
``--deterministic``, says so in a note (those do not split a row: docs/reference.md §3).
Missing runs, missing seeds and unfinished runs are listed under each table, never filled in.
Every row says how many of the benchmark's tasks it covers ("20/20"); a row covering fewer
(``--tasks N``, an unfinished run) reads "1/20 partial", the paper figures beside it say the
task count they are for ("71.3 (20 tasks)"), and a note under the table says the row is not
comparable to the paper's value.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.counts import class_counts
from analysis.memory import MethodMemory, memory_report, mib
from analysis.metrics import (
    final_accuracies,
    layer_stats,
    paired_comparison,
    per_seed,
    summarize,
    weighted_entropy_bits,
)
from analysis.paper import load_paper, paper_value
from analysis.runs import (
    LeftOut,
    Run,
    display_label,
    is_default,
    label_base,
    load_runs,
    pool_size,
    registered_of,
    results_parser,
    select,
    task_streams,
    variants_beside,
)
from benchmarks.core.protocols import DEFAULT_SEEDS
from benchmarks.methods.table import METHODS
from nws.atomic import StorageError, atomic_write_text

PAPER_ARCH = "resnet18"
TABLE3_METHODS = ("finetune", "nws")


@dataclass
class Table:
    name: str
    caption: str
    header: list[str]
    cells: list[list[str]]  # formatted, for Markdown and LaTeX
    data: pd.DataFrame  # numbers, for CSV
    notes: list[str] = field(default_factory=list)


# -- formatting -----------------------------------------------------------------------


def _num(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _pm(mean: float, std: float) -> str:
    return _num(mean) if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def to_markdown(t: Table) -> str:
    lines = [f"**{t.caption}**", "", "| " + " | ".join(t.header) + " |",
             "|" + "|".join("---" for _ in t.header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in t.cells]
    lines += [""] + [f"- {n}" for n in t.notes]
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"),
                 ("#", r"\#"), ("±", r"$\pm$")):
        s = s.replace(a, b)
    return s


def to_latex(t: Table) -> str:
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "r" * (len(t.header) - 1) + "}", r"\toprule",
             " & ".join(_tex(h) for h in t.header) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(c) for c in row) + r" \\" for row in t.cells]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex(t.caption)}}}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"


def write(t: Table, out: Path) -> list[Path]:
    paths = [out / f"{t.name}.md", out / f"{t.name}.csv", out / f"{t.name}.tex"]
    atomic_write_text(paths[0], to_markdown(t))
    atomic_write_text(paths[1], t.data.to_csv(index=False))
    atomic_write_text(paths[2], to_latex(t))
    return paths


# -- per-group facts ------------------------------------------------------------------


@dataclass
class Group:
    """The runs of one benchmark under one protocol."""

    benchmark: str
    protocol: str
    runs: list[Run]
    paper: pd.DataFrame
    results: Path
    left_out: list[LeftOut] = field(default_factory=list)  # damaged runs of this group
    _memory: dict[str, dict[str, MethodMemory]] = field(default_factory=dict)

    @functools.cached_property
    def seeds(self) -> pd.DataFrame:
        return per_seed(pd.concat([r.rows for r in self.runs], ignore_index=True))

    @property
    def planned_tasks(self) -> int:
        return max(r.planned_tasks for r in self.runs)

    @property
    def benchmark_tasks(self) -> int:
        """Tasks of the whole benchmark (what the paper's figures cover), without the data."""
        try:
            return len(class_counts(self.benchmark))
        except KeyError:
            return self.planned_tasks

    @property
    def synthetic(self) -> bool:
        return any(bool(r.rows.synthetic.iloc[0]) for r in self.runs if "synthetic" in r.rows)

    def describe(self) -> str:
        seeds = sorted({r.seed for r in self.runs})
        tag = " (synthetic data)" if self.synthetic else ""
        return (f"benchmark {self.benchmark}{tag}, protocol {self.protocol}, "
                f"seeds {', '.join(map(str, seeds))}")

    def method_runs(self, method: str, arch: str) -> list[Run]:
        return select(self.runs, method=method, arch=arch)

    def memory(self, arch: str) -> dict[str, MethodMemory]:
        if arch not in self._memory:
            try:
                self._memory[arch] = memory_report(self.benchmark, arch, results=self.results,
                                                   stored=False)
            except KeyError:  # a benchmark or architecture without analytic counts
                self._memory[arch] = {}
        return self._memory[arch]

    def missing(self, method: str, arch: str) -> list[str]:
        """What is missing for (method, arch): no run, seeds, unfinished tasks."""
        runs = self.method_runs(method, arch)
        if not runs:
            return [f"{method}/{arch}: no run"]
        notes = []
        expected = set(DEFAULT_SEEDS.get(self.protocol, []))  # one run elsewhere: any seed
        lacking = sorted(expected - {r.seed for r in runs})
        if lacking:
            notes.append(f"{method}/{arch}: seeds {lacking} missing (protocol "
                         f"{self.protocol} expects {sorted(expected)})")
        for r in runs:
            if r.learned_tasks < r.planned_tasks:
                notes.append(f"{method}/{arch} seed {r.seed}: {r.learned_tasks}/"
                             f"{r.planned_tasks} tasks learned (unfinished)")
        return notes

    def run_notes(self, method: str, arch: str) -> list[str]:
        """Duplicates left out of (method, arch), and device types or ``--deterministic``
        flags mixed within it (recorded, not splitting: module doc)."""
        runs = self.method_runs(method, arch)
        notes = [r.duplicate_note for r in runs if r.duplicate_note]
        for key, what in (("device_type", "device types"), ("deterministic", "--deterministic")):
            seen: dict[str, list[int]] = {}
            for r in runs:
                seen.setdefault(str(r.identity.get(key, "unknown")), []).append(r.seed)
            if len(seen) > 1:
                mixed = "; ".join(f"{v}: seeds {sorted(s)}" for v, s in sorted(seen.items()))
                notes.append(f"{method}/{arch}: seeds mix {what} ({mixed})")
        return notes

    def partial_note(self, method: str, arch: str, tasks: int) -> str | None:
        """The note for a row covering fewer tasks than the benchmark (``--tasks N`` or an
        unfinished run), or None for a full row. Its wording matches the row's cells."""
        if tasks >= self.benchmark_tasks:
            return None
        return (f"{method}/{arch}: partial: {tasks} of {self.benchmark_tasks} tasks; not "
                f"comparable to the paper's value ({self.benchmark_tasks} tasks)")

    def summary(self, method: str, arch: str) -> dict[str, float]:
        """Accuracy over seeds (percent), forgetting, stored and paper-convention MiB."""
        s = self.seeds[(self.seeds.method == method) & (self.seeds.arch == arch)]
        acc = summarize(100 * s.avg_accuracy)
        stored = [_final_store_bytes(r) for r in self.method_runs(method, arch)]
        mem = self.memory(arch).get(self.paper_name(method))
        conv = mem.paper_convention.total() if mem and mem.paper_convention else None
        stored = [b for b in stored if b is not None]
        return {"seeds": acc.n, "tasks": int(s.tasks.min()) if len(s) else 0,
                "acc_mean": acc.mean, "acc_std": acc.std, "ci_low": acc.ci_low,
                "ci_high": acc.ci_high,
                "forgetting": 100 * float(s.avg_forgetting.mean()) if len(s) else math.nan,
                "stored_mib": mib(float(np.mean(stored))) if stored else math.nan,
                "paper_convention_mib": mib(conv) if conv is not None else math.nan}

    def paper_name(self, method: str) -> str:
        """The paper's name for a label: its method's when its runs used the method's
        defaults (a partial run included, ``--tasks N``), else the label (no paper figure)."""
        runs = [r for r in self.runs if r.method == method]
        if runs and all(r.comparable for r in runs):
            return runs[0].registered_method
        return method

    def reported(self, method: str, arch: str, metric: str,
                 task: int | None = None) -> float:
        v = paper_value(self.paper, self.benchmark, self.paper_name(method), arch, metric,
                        task)
        return math.nan if v is None else v


def _final_store_bytes(run: Run) -> float | None:
    rows = run.rows[run.rows.metric == "store_bytes"]
    return float(rows.sort_values("after_task").value.iloc[-1]) if len(rows) else None


def _methods(group: Group, arch: str) -> list[str]:
    """Registered methods, then any other label with runs or paper values, each label beside
    its method's."""
    seen = list(METHODS.names())
    seen += [r.method for r in group.runs if r.arch == arch]
    seen += list(group.paper[(group.paper.benchmark == group.benchmark)
                             & (group.paper.arch == arch)].method)
    return variants_beside(list(dict.fromkeys(seen)))


# -- the tables -----------------------------------------------------------------------

SUMMARY_HEADER = ["Method", "Seeds", "Tasks", "Avg acc (%)", "95% CI", "Paper acc (%)",
                  "Forgetting (%)", "Stored (MiB)", "Paper conv. (MiB)", "Paper (MiB)"]


def _summary_row(g: Group, method: str, arch: str, label: str) -> tuple[list[str], dict]:
    s = g.summary(method, arch)
    paper_acc = g.reported(method, arch, "avg_accuracy")
    paper_mem = g.reported(method, arch, "memory")
    partial = s["seeds"] > 0 and g.partial_note(method, arch, s["tasks"]) is not None
    record = {"method": method, "arch": arch, **s, "benchmark_tasks": g.benchmark_tasks,
              "partial": partial, "paper_acc": paper_acc, "paper_mib": paper_mem}
    if s["seeds"] == 0:
        ours, forgetting = ["missing", "-", "-", "-"], "-"
    else:
        ci = "-" if math.isnan(s["ci_low"]) else f"[{s['ci_low']:.1f}, {s['ci_high']:.1f}]"
        ours = [str(s["seeds"]), _tasks_cell(s["tasks"], g.benchmark_tasks),
                _pm(s["acc_mean"], s["acc_std"]), ci]
        forgetting = _num(s["forgetting"], ".2f")
    cells = [label, *ours, _paper_cell(paper_acc, g, partial), forgetting,
             _num(s["stored_mib"], ".2f"), _num(s["paper_convention_mib"], ".2f"),
             _paper_cell(paper_mem, g, partial)]
    return cells, record


def _tasks_cell(tasks: int, total: int) -> str:
    """'20/20', or '1/20 partial' for a row covering part of the benchmark."""
    return f"{tasks}/{total}" + (" partial" if tasks < total else "")


def _paper_cell(value: float, g: Group, partial: bool) -> str:
    """A paper figure; beside a partial row it says the task count it is for."""
    text = _num(value)
    return f"{text} ({g.benchmark_tasks} tasks)" if partial and text != "-" else text


def _partial_notes(g: Group, method: str, arch: str) -> list[str]:
    s = g.seeds[(g.seeds.method == method) & (g.seeds.arch == arch)]
    note = g.partial_note(method, arch, int(s.tasks.min())) if len(s) else None
    return [note] if note else []


def table1(g: Group) -> Table:
    cells, records, notes = [], [], []
    for method in _methods(g, PAPER_ARCH):
        c, r = _summary_row(g, method, PAPER_ARCH, display_label(method, short=True))
        cells.append(c)
        records.append(r)
        notes += (g.missing(method, PAPER_ARCH) + _partial_notes(g, method, PAPER_ARCH)
                  + g.run_notes(method, PAPER_ARCH))
        if g.paper_name(method) == method and not is_default(method) and g.method_runs(
                method, PAPER_ARCH):  # not the paper's settings
            notes.append(f"{display_label(method)}: not {registered_of(method)}'s default "
                         "settings: stored = the runs' artifact stores; the paper columns do "
                         "not apply")
    notes += _memory_notes(g, PAPER_ARCH)
    return Table(f"table1_{g.benchmark}_{g.protocol}",
                 f"Table 1 layout: average accuracy and memory, {PAPER_ARCH}, {g.describe()}",
                 SUMMARY_HEADER, cells, pd.DataFrame(records), notes)


def table3(g: Group) -> Table:
    archs = [r.arch for r in g.runs]
    archs += list(g.paper[(g.paper.benchmark == g.benchmark) & (g.paper.table == 3)].arch)
    cells, records, notes = [], [], []
    labels = variants_beside(list(dict.fromkeys(
        [*TABLE3_METHODS, *(r.method for r in g.runs if registered_of(r.method)
                            in TABLE3_METHODS)])))
    for method in labels:
        # a label other than a method's defaults has rows only where it has runs
        ran = {r.arch for r in g.runs if r.method == method}
        for arch in (a for a in dict.fromkeys(archs) if is_default(method) or a in ran):
            base = label_base(method)
            c, r = _summary_row(g, method, arch, method.replace(base, f"{base}-{arch}", 1))
            cells.append(c)
            records.append(r)
            notes += (g.missing(method, arch) + _partial_notes(g, method, arch)
                      + g.run_notes(method, arch))
    return Table(f"table3_{g.benchmark}_{g.protocol}",
                 f"Table 3 layout: architectures, {g.describe()}", SUMMARY_HEADER, cells,
                 pd.DataFrame(records), notes)


def table2(g: Group) -> Table:
    tasks = list(range(g.benchmark_tasks))
    header = ["Method", "Source", *[f"T{t + 1}" for t in tasks], "Avg", "Memory (MiB)"]
    cells, records, notes = [], [], []
    for method in _methods(g, PAPER_ARCH):
        runs = g.method_runs(method, PAPER_ARCH)  # one per seed (analysis.identity.dedupe)
        finals = pd.DataFrame({r.run_id: 100 * final_accuracies(r.rows) for r in runs})
        s = g.summary(method, PAPER_ARCH)
        ours = [_pm(finals.loc[t].mean(), finals.loc[t].std()) if t in finals.index else "-"
                for t in tasks]
        partial = bool(runs) and g.partial_note(method, PAPER_ARCH, s["tasks"]) is not None
        avg = _pm(s["acc_mean"], s["acc_std"]) if runs else "-"
        if partial:
            avg += f" (partial: {s['tasks']} of {g.benchmark_tasks} tasks)"
        seeds = len({r.seed for r in runs})
        cells.append([method, f"ours (seeds: {seeds})" if runs else "ours (missing)", *ours,
                      avg, _num(s["stored_mib"], ".2f")])
        paper = [g.reported(method, PAPER_ARCH, "accuracy", t) for t in tasks]
        paper_avg = g.reported(method, PAPER_ARCH, "avg_accuracy")
        if not all(math.isnan(x) for x in [*paper, paper_avg]):
            cells.append([method, "paper", *map(_num, paper), _num(paper_avg),
                          _num(g.reported(method, PAPER_ARCH, "memory"))])
        for t in tasks:
            col = finals.loc[t] if t in finals.index else pd.Series(dtype=float)
            records.append({"method": method, "task": t, "seeds": int(col.notna().sum()),
                            "acc_mean": col.mean(), "acc_std": col.std(),
                            "paper_acc": paper[t]})
        notes += (g.missing(method, PAPER_ARCH) + _partial_notes(g, method, PAPER_ARCH)
                  + g.run_notes(method, PAPER_ARCH))
    notes.append("cells: mean ± std over seeds of each task's accuracy (%) after the last "
                 "task; memory: stored bytes (ours) and the paper's figure")
    return Table(f"table2_{g.benchmark}_{g.protocol}",
                 f"Table 2 layout: task-wise accuracy, {PAPER_ARCH}, {g.describe()}",
                 header, cells, pd.DataFrame(records), notes)


def pairs_table(g: Group) -> Table | None:
    p = paired_comparison(g.seeds)
    if p.empty:
        return None
    cells = [[f"nws - {r.baseline}", r.arch, str(r.seeds), _num(100 * r.mean_diff, "+.2f"),
              "-" if math.isnan(r.ci_low) else f"[{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}]",
              _num(r.p_value, ".3g")] for r in p.itertuples()]
    notes = [r.duplicate_note for r in g.runs if r.duplicate_note]
    notes.append("each row and its reference: the runs of one experiment (settings equal but "
                 "for the seed)")
    return Table(f"pairs_{g.benchmark}_{g.protocol}",
                 f"NWS minus each baseline, average accuracy, paired by seed, {g.describe()}",
                 ["Comparison", "Arch", "Seeds", "Diff (pp)", "95% CI (pp)", "p (paired t)"],
                 cells, p, notes)


def bits_table(g: Group) -> Table | None:
    """Bits per index of one NWS run: entropy bound, stored, the paper's int16 + lzma."""
    runs = sorted(g.method_runs("nws", PAPER_ARCH), key=lambda r: (-r.learned_tasks, r.seed))
    run = next((r for r in runs if task_streams(r, "task_indices")), None)
    if run is None:
        return None
    mem = g.memory(PAPER_ARCH).get("nws")
    n = pool_size(run)
    rows = run.rows[(run.rows.metric == "bits_per_index") & (run.rows.task == run.rows.after_task)]
    stored = dict(zip(rows.task.astype(int), rows.value, strict=True))
    records = []
    for t, layers in task_streams(run, "task_indices").items():
        stats = layer_stats(layers, n)
        count = int(stats.kernels.sum())
        lz = mem.paper_convention.per_task[t].get("indices (int16 + lzma)") if (
            mem and mem.paper_convention and t < len(mem.paper_convention.per_task)) else None
        records.append({"task": t, "indices": count,
                        "entropy_bits": weighted_entropy_bits(stats),
                        "stored_bits": stored.get(t, math.nan),
                        "lzma_int16_bits": math.nan if lz is None else 8 * lz / count})
    df = pd.DataFrame(records)
    cells = [[str(r.task + 1), str(r.indices), _num(r.entropy_bits, ".3f"),
              _num(r.stored_bits, ".3f"), _num(r.lzma_int16_bits, ".3f")]
             for r in df.itertuples()]
    return Table(f"bits_{g.benchmark}_{g.protocol}",
                 f"NWS bits per index, seed {run.seed} of {g.describe()}",
                 ["Task", "Indices", "Entropy (bits)", "Stored (bits)", "int16+lzma (bits)"],
                 cells, df, [f"pool size {n}; entropy: per-layer order-0, weighted by size; "
                             "stored: the run's bits_per_index rows (the suite's codec)"])


def _memory_notes(g: Group, arch: str) -> list[str]:
    notes = ["Stored: payload bytes in the artifact store after the last task learned "
             "(mean over seeds); paper conv.: the paper's counting rules, analytic for the "
             f"whole benchmark ({g.benchmark_tasks} tasks; analysis/memory.py)"]
    for m, mm in g.memory(arch).items():
        notes += [f"{m}: {n}" for n in mm.notes if n.startswith("paper convention")]
    return notes


def build_tables(results: str | Path, benchmark: str | None = None,
                 protocol: str | None = None) -> tuple[list[Table], list[str]]:
    """Every table for the selected runs, and messages about what could not be shown."""
    left_out: list[LeftOut] = []
    runs = select(load_runs(results, left_out), benchmark=benchmark, protocol=protocol)
    left_out = [x for x in left_out if x.run is None or select([x.run], benchmark=benchmark,
                                                                protocol=protocol)]
    messages = [f"{x.dir}: {x.line()}" for x in left_out]
    if not runs:
        what = " ".join(f"{k} {v}" for k, v in (("benchmark", benchmark),
                                               ("protocol", protocol)) if v)
        return [], [*messages,
                    f"no runs{' for ' + what if what else ''} under {results}: nothing to show"]
    paper = load_paper()
    tables = []
    keys = sorted({(r.benchmark, r.protocol) for r in runs})
    for b, p in keys:
        g = Group(b, p, select(runs, benchmark=b, protocol=p), paper, Path(results),
                  [x for x in left_out if x.run is not None and select([x.run], benchmark=b,
                                                                        protocol=p)])
        for t in (table1(g), table2(g), table3(g)):  # damaged runs: named, never averaged
            t.notes += [x.line() for x in g.left_out]
            tables.append(t)
        tables += [t for t in (pairs_table(g), bits_table(g)) if t is not None]
    return tables, messages


def main(argv: list[str] | None = None) -> int:
    args = results_parser("python -m analysis.tables", __doc__,
                          "results/tables").parse_args(argv)
    if args.benchmark is not None:
        try:
            class_counts(args.benchmark)
        except KeyError as err:
            print(f"note: {err.args[0]}", file=sys.stderr)
    tables, messages = build_tables(args.results, args.benchmark, args.protocol)
    for m in messages:
        print(m)
    for t in tables:
        try:
            paths = write(t, Path(args.out))
        except StorageError as err:  # a full or read-only disk: the file and what to do
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{t.caption}\n  -> {', '.join(str(x) for x in paths)}")
        for n in t.notes:
            print(f"  {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
