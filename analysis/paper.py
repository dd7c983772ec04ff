"""The paper's reported numbers, shipped as package data in ``analysis/paper_data/``
(``table{1,2,3}.csv``), read through :mod:`importlib.resources`: the same files in a checkout,
an editable install and an installed wheel.

Columns: ``table, row`` (the paper's row label), ``method, arch, benchmark`` (suite names),
``metric`` (``accuracy`` per task, ``avg_accuracy``, ``memory``), ``task, task_name,
value, unit`` (accuracy in %, memory in the paper's "MB", which are MiB: docs/reference.md,
memory conventions).
"""

from __future__ import annotations

import functools
import warnings
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

import pandas as pd

PAPER_PACKAGE = "analysis.paper_data"
COLUMNS = ["table", "row", "method", "arch", "benchmark", "metric", "task", "task_name",
           "value", "unit"]


class PaperDataMissingWarning(UserWarning):
    """The paper's tables were not found: every paper column reads ``-``."""


def paper_dir() -> Traversable:
    """Where the paper's CSVs are: the package folder ``analysis/paper_data``."""
    return resources.files(PAPER_PACKAGE)


def _table_files(directory: Traversable | Path) -> list[Traversable | Path]:
    return sorted((f for f in directory.iterdir()
                   if f.name.startswith("table") and f.name.endswith(".csv")),
                  key=lambda f: f.name)


@functools.lru_cache(maxsize=1)
def _packaged() -> pd.DataFrame:
    return _read(paper_dir())


def _read(directory: Traversable | Path) -> pd.DataFrame:
    try:
        files = _table_files(directory) if directory.is_dir() else []
    except (FileNotFoundError, NotADirectoryError):
        files = []
    if not files:
        warnings.warn(f"the paper's tables (table1-3.csv) are not in {directory}: every "
                      "paper column reads '-'. Reinstall the suite (pip install nws-bench) or "
                      "restore analysis/paper_data/ from the repository",
                      PaperDataMissingWarning, stacklevel=3)
        return pd.DataFrame(columns=COLUMNS)
    frames = []
    for f in files:
        with f.open("r") as fh:
            frames.append(pd.read_csv(fh))
    return pd.concat(frames, ignore_index=True)


def load_paper(directory: str | Path | None = None) -> pd.DataFrame:
    """The paper's rows (a copy): from the package data, or from ``directory`` (a folder of
    ``table*.csv``). Warns (:class:`PaperDataMissingWarning`) when no table is found."""
    if directory is None:
        return _packaged().copy()
    return _read(Path(directory))


def paper_value(paper: pd.DataFrame, benchmark: str, method: str, arch: str, metric: str,
                task: int | None = None) -> float | None:
    """One reported number, or None when the paper has none for this combination."""
    sel = paper[(paper.benchmark == benchmark) & (paper.method == method)
                & (paper.arch == arch) & (paper.metric == metric)]
    if task is not None:
        sel = sel[sel.task == task]
    return float(sel.value.iloc[0]) if len(sel) else None
