"""The results store of one run: ``results/runs/<run id>/``.

Files (every write is atomic):

- ``rows.csv``: tidy rows, one measurement each, columns :data:`COLUMNS`; load with
  :func:`load_rows` (one run dir or a folder of them; ``with_config=True`` adds each run's
  settings) or ``pandas.read_csv``. The ``schema`` column is the file's layout version
  (:data:`SCHEMA_VERSION`); a file without it is version 1 (the same columns, written before
  the column existed) and loads as such.
- ``config.json``: the resolved configuration (protocol with provenance, method options).
- ``env.json``: library versions, git commit, device, deterministic flag.
- ``artifacts/``: the artifact store (:mod:`benchmarks.core.store`).

Metrics (``task`` is the task measured, ``after_task`` the last task learned then):

- ``accuracy``: top-1 on ``task``'s test split, of the model rebuilt from the store after
  learning ``after_task`` (the accuracy matrix R[after_task][task]).
- ``task_bytes``: payload bytes of ``task``'s blobs; ``shared_bytes`` and ``store_bytes``:
  the shared blobs and the whole store after ``after_task``.
- ``train_seconds``, ``train_steps``, ``final_train_loss``: of learning ``task``.
- ``task_seconds``: wall time of this launch's work on ``task``: learning it (model set-up,
  NWS's pools, every phase), committing it to the store and evaluating every task learned so
  far from the store; for a task found in the store but not evaluated (a resumed run), the
  evaluation only. ``train_seconds`` and ``task_seconds`` are :data:`TIMING_METRICS`: they
  differ between otherwise identical runs.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from nws.atomic import atomic_write_text, storage_error

log = logging.getLogger(__name__)

TIMING_METRICS = ("train_seconds", "task_seconds")
SCHEMA_VERSION = 2  # 1: no ``schema`` column; 2: the ``schema`` column added
# What makes a config.json a run's (the harness writes them all): a folder whose config.json
# has none of them is another tool's folder, not a damaged run.
RUN_CONFIG_KEYS = ("identity", "run_id", "tasks")
COLUMNS = [
    "run_id", "benchmark", "method", "arch", "protocol", "seed", "synthetic",
    "task", "task_name", "after_task", "metric", "value", "schema",
]
CONFIG_PREFIX = "config."  # the columns ``load_rows(with_config=True)`` adds


def with_schema(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``schema`` column: a file written without one is version 1."""
    if "schema" not in df.columns:
        df = df.assign(schema=1)
    return df


def read_rows(path: Path) -> pd.DataFrame:
    """One run's ``rows.csv`` (empty frame if absent). Raises ``ValueError`` (CLI exit 2)
    naming the file when it is damaged: the artifact store beside it is intact, so deleting
    the file makes the next launch evaluate every stored task again without retraining."""
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        why = str(err).strip()
    else:
        missing = [c for c in COLUMNS if c not in df.columns and c != "schema"]
        if not missing:
            return with_schema(df)
        why = f"columns {missing} missing"
    raise ValueError(f"{path} is damaged ({why}); the stored tasks in artifacts/ are intact: "
                     f"delete {path.name} and launch again to evaluate them again (no "
                     f"retraining)")


class NotARunError(ValueError):
    """A folder whose ``config.json`` is another tool's (no run's keys, no rows.csv)."""


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """A run folder's ``config.json`` (None when absent), checked to be a run's: a dict with
    some of :data:`RUN_CONFIG_KEYS`, each of the type the harness writes. Raises
    :class:`NotARunError` for another tool's file (none of those keys, no ``rows.csv`` beside
    it), ``ValueError`` naming the file and why for a damaged one."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} cannot be read as JSON ({type(err).__name__}: {err})") from err
    kind = type(config).__name__
    if not isinstance(config, dict) or not set(RUN_CONFIG_KEYS) & set(config):
        if not (path.parent / "rows.csv").exists():
            raise NotARunError(f"{path} is not a run's configuration (a JSON {kind} without "
                               f"{', '.join(RUN_CONFIG_KEYS)}): another tool's folder?")
        raise ValueError(f"{path} is not a run's configuration (a JSON {kind}) although "
                         f"rows.csv is beside it")
    types = {"identity": dict, "run_id": str, "tasks": list}
    wrong = [k for k, t in types.items() if k in config and not isinstance(config[k], t)]
    if wrong:
        raise ValueError(f"{path} is damaged: {wrong} not of the types a run writes "
                         f"({', '.join(f'{k}: {types[k].__name__}' for k in wrong)})")
    return config


def rows_damage(rows: pd.DataFrame) -> str | None:
    """Why a run's rows cannot be averaged as results, or None: an accuracy that is not a
    number in [0, 1] (a NaN from a broken evaluation). Such a run is reported damaged by
    ``benchmarks.status`` and left out of every mean by the analysis, never averaged over the
    tasks that remain."""
    acc = rows[rows.metric == "accuracy"]
    values = pd.to_numeric(acc.value, errors="coerce")
    bad = acc[~values.between(0, 1)]
    if bad.empty:
        return None
    where = [f"task {t} after task {a}: {v}" for t, a, v in
             zip(bad.task, bad.after_task, bad.value, strict=True)]
    more = f" (+{len(where) - 3} more)" if len(where) > 3 else ""
    return (f"accuracy not a number in [0, 1] ({'; '.join(where[:3])}{more}); delete rows.csv "
            f"and launch again to evaluate the stored tasks again")


class ResultsStore:
    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir).resolve()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise storage_error(self.dir, err, "cannot create the run folder") from err
        self.rows_path = self.dir / "rows.csv"

    def rows(self) -> pd.DataFrame:
        return read_rows(self.rows_path)

    def append(self, rows: list[dict[str, Any]]) -> None:
        new = pd.DataFrame(rows, columns=COLUMNS)
        old = self.rows()
        frame = new if old.empty else pd.concat([old, new], ignore_index=True)
        frame["schema"] = SCHEMA_VERSION  # the whole file is rewritten in this layout
        buf = io.StringIO()
        frame.to_csv(buf, index=False)
        atomic_write_text(self.rows_path, buf.getvalue())

    def finished_tasks(self) -> set[int]:
        """Tasks whose own accuracy row exists (written last for each task)."""
        df = self.rows()
        done = df[(df.metric == "accuracy") & (df.task == df.after_task)]
        return {int(t) for t in done.task}

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.dir / name, json.dumps(obj, indent=2, sort_keys=True, default=str))

    def read_json(self, name: str) -> Any | None:
        return self.read_json_at(self.dir / name)

    @staticmethod
    def read_json_at(path: Path) -> Any | None:
        return json.loads(path.read_text()) if path.exists() else None


def load_rows(path: str | Path, with_config: bool = False) -> pd.DataFrame:
    """All rows under ``path``: one run dir (a damaged rows.csv raises ``ValueError``), or a
    folder holding run dirs (recursively; a damaged rows.csv is left out with a warning).

    ``with_config``: each row also gets its run's settings from ``config.json``: the run
    identity flattened to ``config.<key>`` columns (``config.options.beta``,
    ``config.protocol.lr``, ``config.pretrained``, ``config.device_type``, ...; NaN where a run
    lacks the key or has no readable ``config.json``) and ``config.group``, equal for the runs
    of one experiment but for the seed (:func:`benchmarks.core.grouping.group_key`), to group by."""
    path = Path(path)
    one = (path / "rows.csv").exists()
    frames = []
    for f in [path / "rows.csv"] if one else sorted(path.rglob("rows.csv")):
        try:
            rows = read_rows(f)
        except ValueError as err:
            if one:
                raise
            log.warning("left out: %s", err)
            continue
        frames.append(_with_config(rows, f.parent) if with_config else rows)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def _with_config(rows: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    from benchmarks.core.grouping import flatten, group_key

    try:
        cfg = ResultsStore.read_json_at(run_dir / "config.json")
        identity = (cfg or {}).get("identity") or {}
    except (ValueError, AttributeError):  # damaged, or another tool's (a list): no settings
        identity = {}
    if not isinstance(identity, dict):
        identity = {}
    columns = {f"{CONFIG_PREFIX}{k}": json.dumps(v) if isinstance(v, list) else v
               for k, v in flatten(identity).items()}
    columns[f"{CONFIG_PREFIX}group"] = group_key(identity) if identity else None
    return rows.assign(**columns)
