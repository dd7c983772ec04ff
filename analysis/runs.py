"""Reading run folders (``results/runs/<run id>/``) and the method hooks analysis uses.

A run folder needs only ``rows.csv``; ``config.json`` (planned tasks, options) and
``artifacts/`` (the artifact store) are used when present. What analysis reads from a
method's store it gets through the method contract's one declared hook,
:meth:`benchmarks.methods.contract.Method.analysis_hooks` (the names:
:data:`benchmarks.methods.contract.ANALYSIS_HOOKS`: ``task_indices``, ``pool_size``,
``task_codes``); a method without them still works everywhere else (``pool_size`` then
falls back to the run option ``pool_size``).

Labels: every run is shown under the label of its experiment, its identity but for the
seed (:mod:`analysis.identity`): the method's name when it ran with the method's defaults,
else the name and what differs (``nws (beta=0.1)``); a run with options that make it the
suite's own extension (:data:`VARIANTS`, e.g. NWS with ``codec=delta``) under the variant's
name (``nws-delta``). The label replaces ``method`` in :attr:`Run.rows`, so every table and
figure keeps different experiments apart; the method hooks are still the registered
method's (:attr:`Run.registered_method`). Two runs of one experiment and seed: the most
complete is kept (:func:`analysis.identity.dedupe`).
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.counts import class_counts
from analysis.identity import VARIANTS, Member, assign_labels, dedupe, method_class
from benchmarks.core.results import NotARunError, read_rows, read_run_config, rows_damage
from benchmarks.core.store import ArtifactStore
from benchmarks.methods.contract import ANALYSIS_HOOKS

log = logging.getLogger(__name__)

PAPER_POOL_SIZE = 512  # paper §4.3: n^l = 512 kernels per pool


def label_base(label: str) -> str:
    """The method or variant name a label starts with (``nws (beta=0.1)`` -> ``nws``)."""
    return label.split(" (", 1)[0]


def registered_of(label: str) -> str:
    """The registered method behind a label."""
    base = label_base(label)
    return VARIANTS[base].method if base in VARIANTS else base


def is_default(label: str) -> bool:
    """A label of a method run with its defaults (the paper's columns apply to it)."""
    return label == label_base(label) and label not in VARIANTS


def variants_beside(methods: list[str]) -> list[str]:
    """``methods`` (labels) with each label moved right after the others of its registered
    method, the method's own (default) label first."""
    out: list[str] = []
    for m in methods:
        family = registered_of(m)
        at = max((i for i, x in enumerate(out) if registered_of(x) == family), default=None)
        out.insert(len(out) if at is None else at + 1, m)
    return out


def display_label(method: str, short: bool = False) -> str:
    """A label's description (``short``: its row and legend label); variants say they are the
    suite's extensions."""
    v = VARIANTS.get(method)
    return method if v is None else v.short if short else v.label


@dataclass
class Run:
    dir: Path
    rows: pd.DataFrame  # its ``method`` column holds the run's label (module doc)
    config: dict[str, Any] | None
    registered: str = ""  # the registered method (rows.csv's own ``method``)
    group: str = ""  # :func:`benchmarks.core.grouping.group_key` of its identity
    duplicate_note: str = ""  # set when other runs of its group and seed were left out
    comparable: bool = True  # the paper's figures apply (defaults, or a partial run of them)

    def _first(self, column: str) -> Any:
        return self.rows[column].iloc[0]

    @property
    def run_id(self) -> str:
        return str(self._first("run_id"))

    @property
    def method(self) -> str:
        return str(self._first("method"))

    @property
    def registered_method(self) -> str:
        """The method class behind the run (see module doc)."""
        return self.registered or registered_of(self.method)

    @property
    def method_spec(self) -> str:
        """What finds the method's class: the spec the run was given (config.json's
        ``run_config.method``: a name, or a plugin's ``pkg.mod:Class``), else its name."""
        spec = ((self.config or {}).get("run_config") or {}).get("method")
        return spec if isinstance(spec, str) and spec else self.registered_method

    @property
    def benchmark(self) -> str:
        return str(self._first("benchmark"))

    @property
    def arch(self) -> str:
        return str(self._first("arch"))

    @property
    def protocol(self) -> str:
        return str(self._first("protocol"))

    @property
    def seed(self) -> int:
        return int(self._first("seed"))

    @property
    def identity(self) -> dict[str, Any]:
        return (self.config or {}).get("identity") or {}

    @property
    def options(self) -> dict[str, Any]:
        return self.identity.get("options", {})

    @property
    def planned_tasks(self) -> int:
        """Tasks the run was asked to learn (config), else the benchmark's, else seen."""
        if self.config and self.config.get("tasks"):
            return len(self.config["tasks"])
        try:
            return len(class_counts(self.benchmark))
        except KeyError:
            return int(self.rows.task.max()) + 1

    @property
    def learned_tasks(self) -> int:
        acc = self.rows[self.rows.metric == "accuracy"]
        return int(acc.after_task.max()) + 1 if len(acc) else 0

    def store(self) -> ArtifactStore | None:
        path = self.dir / "artifacts"
        return ArtifactStore(path, readonly=True) if (path / "index.json").exists() else None


@dataclass(frozen=True)
class LeftOut:
    """A folder :func:`load_runs` left out, and why; ``run`` when its rows could be read (a
    run with a NaN accuracy: tables name it under its method and seed)."""

    dir: Path
    why: str
    run: Run | None = None

    def line(self) -> str:
        who = (f"{self.run.method}/{self.run.arch} seed {self.run.seed}: "
               if self.run is not None else "")
        return f"{who}left out, damaged: {self.why}"


def load_runs(results: str | Path, left_out: list[LeftOut] | None = None) -> list[Run]:
    """Every run folder under ``results`` (a run folder itself, or a folder of them),
    labelled by experiment, one per (experiment, seed) (module doc). A folder that is not a
    run (another tool's ``config.json``) is skipped; a damaged one (its ``config.json`` or
    ``rows.csv`` unreadable, an accuracy not a number in [0, 1]) is left out with a warning
    and appended to ``left_out``: one bad folder never stops the rest, and no mean is taken
    over the tasks of a run that remain."""
    results = Path(results)
    if not results.exists():
        return []
    files = ([results / "rows.csv"] if (results / "rows.csv").exists()
             else sorted(results.rglob("rows.csv")))
    runs = []
    for f in files:
        try:
            cfg = read_run_config(f.parent)
            rows = read_rows(f)
        except NotARunError as err:
            log.info("skipped: %s", err)
            continue
        except ValueError as err:
            log.warning("run folder %s left out: %s", f.parent, err)
            if left_out is not None:
                left_out.append(LeftOut(f.parent, str(err)))
            continue
        if rows.empty:
            continue
        registered = str(rows["method"].iloc[0])
        damage = rows_damage(rows)
        if damage:
            log.warning("run folder %s left out: %s: %s", f.parent, f, damage)
            if left_out is not None:
                left_out.append(LeftOut(f.parent, f"{f}: {damage}",
                                        Run(f.parent, rows, cfg, registered=registered)))
            continue
        runs.append(Run(f.parent, rows, cfg, registered=registered))
    return label_runs(runs)


def label_runs(runs: list[Run]) -> list[Run]:
    """Set each run's label (its rows' ``method``) and group; drop duplicates (module doc)."""
    members = [Member(r.dir, r.registered_method, r.benchmark, r.arch, r.protocol, r.seed,
                      r.identity, (r.config or {}).get("run_config") or {},
                      (r.learned_tasks, len(r.rows)), spec=r.method_spec) for r in runs]
    assign_labels(members)
    kept, _ = dedupe(members)
    by_dir = {r.dir: r for r in runs}
    out = []
    for m in kept:
        run = by_dir[m.dir]
        run.rows["method"] = m.label
        run.group, run.duplicate_note, run.comparable = m.group, m.duplicate_note, m.comparable
        out.append(run)
    return out


def select(runs: list[Run], **want: Any) -> list[Run]:
    """Runs whose attributes (benchmark=, method=, arch=, protocol=) match."""
    return [r for r in runs if all(getattr(r, k) == v for k, v in want.items() if v is not None)]


@functools.cache
def method_hook(method: str, hook: str) -> Callable[..., Any] | int | None:
    """The declared analysis hook ``hook`` (:data:`ANALYSIS_HOOKS`) of the method ``method``
    (a name or a plugin's spec: :attr:`Run.method_spec`; cached per spec), or None when
    the class cannot be imported or does not declare it. Raises ``KeyError`` for a name the
    contract does not declare (a typo here would silently drop runs)."""
    if hook not in ANALYSIS_HOOKS:
        raise KeyError(f"{hook!r} is not an analysis hook; declared: {', '.join(ANALYSIS_HOOKS)}")
    cls, _ = method_class(method)
    return None if cls is None else cls.analysis_hooks().get(hook)


def task_streams(run: Run, hook: str) -> dict[int, dict[str, np.ndarray]]:
    """Per task, the integer streams the method's ``hook`` reads from the run's store.

    A store that cannot be read (a blob's file missing or damaged, a delta chain broken:
    the method's own error, e.g. :class:`benchmarks.methods.nws_method.BrokenChainError`) is logged
    as a warning naming the run and the error and counts as no store ({}): the analyses
    that need the streams leave the run out, the rest of the analysis goes on."""
    fn = method_hook(run.method_spec, hook)
    store = run.store() if callable(fn) else None
    if store is None:
        return {}
    try:
        return {t: {k: np.asarray(v) for k, v in fn(store, t).items()} for t in store.tasks()}
    except (OSError, ValueError) as err:
        log.warning("run %s left out of the analyses of its stored tasks: %s", run.dir, err)
        return {}


def pool_size(run: Run) -> int:
    hook = method_hook(run.method_spec, "pool_size")
    store = run.store()
    if callable(hook) and store is not None:
        return int(hook(store))
    if isinstance(hook, int):
        return hook
    return int(run.options.get("pool_size", PAPER_POOL_SIZE))


def results_parser(prog: str, doc: str | None, default_out: str) -> argparse.ArgumentParser:
    """The command line shared by ``analysis.tables`` and ``analysis.figures``."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results/runs", help="folder of run folders")
    p.add_argument("--benchmark", default=None, help="only this benchmark (default: all)")
    p.add_argument("--protocol", default=None, help="only this protocol (default: all)")
    p.add_argument("--out", default=default_out, help="output folder")
    return p
