"""What the conformance check compares (:mod:`benchmarks.perf.conformance`): a memory formula
with the stored bytes, two runs' rows, blobs and logits, a method's declared settings. Each
function returns the differences as lines (none: they agree)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from benchmarks.core.breakdown import Breakdown
from benchmarks.core.checks import Check
from benchmarks.core.protocols import S
from benchmarks.core.results import TIMING_METRICS, ResultsStore, load_rows
from benchmarks.core.store import ArtifactStore
from benchmarks.data import BENCHMARKS

UNKNOWN_OPTION = "no_such_option_conformance_check"


def memory_violations(formula: Breakdown, stored: Breakdown) -> list[str]:
    """Where ``formula`` (a method's ``memory_formula``) and ``stored`` (the store's
    :meth:`~benchmarks.core.store.ArtifactStore.breakdown`) differ, blob by blob."""
    out: list[str] = []

    def compare(where: str, want: dict[str, int], got: dict[str, int]) -> None:
        for name in sorted(set(want) | set(got)):
            if name not in got:
                out.append(f"{where} blob {name!r}: {want[name]:,} B in the formula, not "
                           f"stored")
            elif name not in want:
                out.append(f"{where} blob {name!r}: {got[name]:,} B stored, not in the formula")
            elif want[name] != got[name]:
                out.append(f"{where} blob {name!r}: formula {want[name]:,} B, stored "
                           f"{got[name]:,} B ({got[name] - want[name]:+,} B)")

    compare("shared", formula.shared, stored.shared)
    if len(formula.per_task) != len(stored.per_task):
        out.append(f"the formula counts {len(formula.per_task)} tasks, the store holds "
                   f"{len(stored.per_task)}")
    for t, (want, got) in enumerate(zip(formula.per_task, stored.per_task, strict=False)):
        compare(f"task {t}", want, got)
    return out


def run_memory(cls: type, run_dir: Path) -> tuple[Breakdown, Breakdown]:
    """(``cls.memory_formula`` for the run's architecture, class counts and resolved options,
    the run's stored bytes)."""
    config = ResultsStore(run_dir).read_json("config.json")
    rc = config["run_config"]
    options = cls.resolve_options(rc["benchmark"], rc["method_options"])
    classes = [t["num_classes"] for t in config["tasks"]]
    formula = cls.memory_formula(rc["arch"], classes, options)
    return formula, ArtifactStore(run_dir / "artifacts", readonly=True).breakdown()


def rows_differences(a: Path, b: Path, query: str | None = None, limit: int = 5,
                     names: tuple[str, str] = ("the first run", "the second")) -> list[str]:
    """Rows of run folders ``a`` and ``b`` (those ``query`` selects, e.g. ``"after_task ==
    2"``) that differ, timings and run ids aside, by (task, after_task, metric), values as
    ``a`` vs ``b``; at most ``limit`` named. ``names``: how to call ``a`` and ``b``."""
    key = ["task", "after_task", "metric"]

    def table(d: Path) -> pd.Series:
        rows = load_rows(d)
        rows = rows[~rows.metric.isin(TIMING_METRICS)]
        return (rows.query(query) if query else rows).set_index(key).value.sort_index()

    x, y = table(a), table(b)
    out = [f"row {k} only in {names[0]}" for k in x.index.difference(y.index)]
    out += [f"row {k} only in {names[1]}" for k in y.index.difference(x.index)]
    both = x.index.intersection(y.index)
    xs, ys = x[both], y[both]
    differ = (xs != ys) & ~(xs.isna() & ys.isna())
    out += [f"row {k}: {xs[k]:.10g} vs {ys[k]:.10g}" for k in both[differ.to_numpy()]]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def blobs(run_dir: Path) -> dict[tuple[int | None, str], bytes]:
    """Every stored blob's bytes, by (task or None for shared, name)."""
    store = ArtifactStore(run_dir / "artifacts", readonly=True)
    return {(t, n): store.get_bytes(n, t) for t in [None, *store.tasks()]
            for n in store.names(t)}


def blob_differences(a: Path, b: Path, names: tuple[str, str] = ("the first run", "the second")
                     ) -> list[str]:
    """Blobs of run folders ``a`` and ``b`` that differ or only one of them holds."""
    x, y = blobs(a), blobs(b)

    def where(t: int | None, n: str) -> str:
        return f"{'shared' if t is None else f'task {t}'} blob {n!r}"

    out = [f"{where(t, n)}: only in {names[0]}" for t, n in sorted(x.keys() - y, key=str)]
    out += [f"{where(t, n)}: only in {names[1]}" for t, n in sorted(y.keys() - x, key=str)]
    out += [f"{where(t, n)} differs ({len(x[t, n]):,} B)"
            for t, n in sorted(x.keys() & y.keys(), key=str) if x[t, n] != y[t, n]]
    return out


def logits_differences(evaluated: dict[int, torch.Tensor], rebuilt: dict[int, torch.Tensor],
                       tasks: int) -> list[str]:
    out = []
    for t in range(tasks):
        if t not in evaluated:
            out.append(f"task {t}: the run evaluated no model of it (load_task not called)")
        elif t not in rebuilt:
            out.append(f"task {t}: not rebuilt in the fresh process")
        elif evaluated[t].shape != rebuilt[t].shape:
            out.append(f"task {t}: logits of shape {tuple(rebuilt[t].shape)} rebuilt, "
                       f"{tuple(evaluated[t].shape)} evaluated")
        elif not torch.equal(evaluated[t], rebuilt[t]):
            diff = (evaluated[t] - rebuilt[t]).abs().max().item()
            out.append(f"task {t}: the model rebuilt from the store in a fresh process gives "
                       f"other logits than the model the run evaluated (max |diff| {diff:.3g})")
    return out


def settings_violations(cls: type) -> list[str]:
    """Each declared option has a source and a range (with its reason) its default is in;
    its scopes are ``default`` or registered benchmarks; defaults resolve; an unknown option
    is refused."""
    out: list[str] = []
    scopes = ["default", *BENCHMARKS.names()]
    for scope, settings in cls.SETTINGS.items():
        if scope not in scopes:
            out.append(f"SETTINGS[{scope!r}]: no such benchmark (valid: {', '.join(scopes)})")
        for key, s in settings.items():
            where = f"option {key!r} ({scope})"
            if not isinstance(s, S):
                out.append(f"{where}: not an S(value, source, check)")
                continue
            if not (isinstance(s.source, str) and s.source.strip()):
                out.append(f"{where}: no source (paper section, reference code, or 'ours')")
            if not isinstance(s.check, Check):
                out.append(f"{where}: declares no range (S(..., check=Range/OneOf/...))")
                continue
            if not getattr(s.check, "why", ""):
                out.append(f"{where}: its range gives no reason")
            problem = s.check.problem(s.value)
            if problem is not None:
                out.append(f"{where}: default {s.value!r} outside its range: {problem}")
    for bench in BENCHMARKS.names():
        try:
            cls.resolve_options(bench, {})
        except (ValueError, TypeError) as err:
            out.append(f"the defaults of {bench} do not resolve: {err}")
        try:
            cls.resolve_options(bench, {UNKNOWN_OPTION: 0})
            out.append(f"an unknown option ({UNKNOWN_OPTION}) was accepted on {bench}")
        except ValueError:
            pass
    return out
