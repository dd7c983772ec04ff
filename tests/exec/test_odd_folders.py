"""Odd folders and records, NaN results (issue 21, items 6 and 7).

``benchmarks.status`` lists a folder that is not a run as ``not-run`` and a damaged one as
``damaged`` with why, and goes on; a NaN accuracy makes a run damaged (never "2/2 tasks"),
and the analysis leaves such a run out of every mean with a note, while the other runs'
tables and figures are still made.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
import pytest

from analysis import figures, tables
from analysis.metrics import per_seed
from benchmarks.core.results import COLUMNS, load_rows
from benchmarks.exec.status import main as status
from benchmarks.exec.sweep import Job, find_run_dir

BENCH = "synthetic"  # no analytic memory counts: the tables are quick


def _write_run(root: Path, method: str, seed: int, acc: list[float], planned: int = 2,
               config: object = "run") -> Path:
    """rows.csv (R[i][j] = acc[j]) and config.json of one run; ``config`` replaces the
    config.json's contents (a str is written as it is)."""
    rid = f"{BENCH}-{method}-resnet18-paper-s{seed}-test"
    base = {"run_id": rid, "benchmark": BENCH, "method": method, "arch": "resnet18",
            "protocol": "paper", "seed": seed, "synthetic": False}
    rows = [base | {"task": j, "task_name": f"t{j}", "after_task": i, "metric": "accuracy",
                    "value": acc[j]} for i in range(len(acc)) for j in range(i + 1)]
    folder = root / rid
    folder.mkdir(parents=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(folder / "rows.csv", index=False)
    if config == "run":
        config = {"identity": {"options": {}}, "run_id": rid,
                  "tasks": [{"index": t} for t in range(planned)],
                  "run_config": {"method": method, "seed": seed}}
    (folder / "config.json").write_text(config if isinstance(config, str)
                                        else json.dumps(config))
    return folder


def _other_tool(root: Path, name: str, config: object) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "runs"
    _write_run(root, "finetune", 1, [0.9, 0.7])  # done, mean 80.0
    _write_run(root, "finetune", 2, [0.5, math.nan])  # task 1's accuracy is NaN
    _other_tool(root, "a-list", [1, 2, 3])
    _other_tool(root, "hf-model", {"architectures": ["BertModel"], "hidden_size": 768})
    return root


def _lines(capsys) -> dict[str, str]:
    out = capsys.readouterr().out.splitlines()
    return {line.split()[1] if len(line.split()) > 1 else line: line for line in out} | {
        "_summary": out[-1]}


def test_status_lists_not_runs_and_a_nan_run_as_damaged(results, capsys):
    assert status(["--results", str(results)]) == 1  # the damaged run is not done
    lines = _lines(capsys)
    nan_run = lines[f"{BENCH}-finetune-resnet18-paper-s2-test"]
    assert nan_run.startswith("damaged") and "task 1 after task 1: nan" in nan_run
    assert "2/2 tasks" not in nan_run and "mean acc" not in nan_run
    assert lines[f"{BENCH}-finetune-resnet18-paper-s1-test"].startswith("done")
    assert lines["a-list"].startswith("not-run") and "a JSON list" in lines["a-list"]
    assert lines["hf-model"].startswith("not-run")
    assert lines["_summary"] == "1 done, 1 damaged, 2 not-run"
    # without the NaN run: every run is done, the other tools' folders do not count
    for f in (results / f"{BENCH}-finetune-resnet18-paper-s2-test").iterdir():
        f.unlink()
    (results / f"{BENCH}-finetune-resnet18-paper-s2-test").rmdir()
    assert status(["--results", str(results)]) == 0


def test_damaged_files_and_job_records_are_named_never_a_traceback(tmp_path, capsys):
    root = tmp_path / "runs"
    _write_run(root, "nws", 1, [0.9, 0.8], config="{not json")
    _write_run(root, "nws", 2, [0.9, 0.8], config=[{"tasks": 2}])  # a list beside rows.csv
    _write_run(root, "nws", 3, [0.9, 0.8], config={"run_id": 3, "tasks": 2})  # wrong types
    _write_run(root, "nws", 6, [0.9, 0.8], config={"identity": {}})  # planned tasks unknown
    cut = _write_run(root, "nws", 4, [0.9], planned=2)
    (cut / "job.json").write_text(json.dumps({"key": "nws-4", "state": "failed"}))  # no end
    listed = _write_run(root, "nws", 5, [0.9, 0.8])
    (listed / "job.json").write_text("[]")
    (root / ".sweep" / "jobs").mkdir(parents=True)
    (root / ".sweep" / "jobs" / "x.json").write_text('["not", "a", "record"]')
    (root / ".sweep" / "jobs" / "y.json").write_text('{"state": "failed"}')  # no key
    assert status(["--results", str(root)]) == 1
    lines = _lines(capsys)
    name = f"{BENCH}-nws-resnet18-paper-s{{}}-test"
    assert lines[name.format(1)].startswith("damaged") and "cannot be read as JSON" in (
        lines[name.format(1)])
    assert lines[name.format(2)].startswith("damaged") and "rows.csv is beside it" in (
        lines[name.format(2)])
    assert lines[name.format(3)].startswith("damaged") and "run_id: str" in lines[name.format(3)]
    assert lines[name.format(4)].startswith("partial") and "no end time" in lines[name.format(4)]
    assert lines[name.format(5)].startswith("done") and "a JSON list" in lines[name.format(5)]
    assert lines[name.format(6)].startswith("damaged") and "has no 'tasks'" in (
        lines[name.format(6)])
    assert lines["_summary"] == "1 done, 1 partial, 4 damaged"
    assert find_run_dir(root, Job("k", "nws", 2, {"method": "nws", "seed": 2})) is None


def test_tables_and_figures_leave_damaged_runs_out_with_a_note(results, tmp_path, caplog):
    _write_run(results, "nws", 1, [0.6, 0.8], config="{not json")  # stops nothing
    out = tmp_path / "tables"
    with caplog.at_level(logging.WARNING):
        assert tables.main(["--results", str(results), "--out", str(out)]) == 0
    assert "left out" in caplog.text and "{not json" not in caplog.text
    t1 = pd.read_csv(out / f"table1_{BENCH}_paper.csv").set_index("method")
    assert t1.loc["finetune", "seeds"] == 1  # the NaN run is no seed of the mean
    assert t1.loc["finetune", "acc_mean"] == pytest.approx(80.0)  # seed 1 only
    md = (out / f"table1_{BENCH}_paper.md").read_text()
    assert "finetune/resnet18 seed 2: left out, damaged: " in md and "nan" in md
    assert figures.main(["--results", str(results), "--out", str(tmp_path / "figs")]) == 0


def test_a_nan_accuracy_is_never_averaged_over_the_tasks_that_remain(results):
    rows = load_rows(results / f"{BENCH}-finetune-resnet18-paper-s2-test")
    seeds = per_seed(rows)
    assert len(seeds) == 1 and math.isnan(seeds.avg_accuracy.iloc[0])  # not 50.0


def test_load_rows_of_a_folder_leaves_a_damaged_rows_csv_out(results, caplog):
    (results / "a-list" / "rows.csv").write_text("\x00\x01garbage")
    with caplog.at_level(logging.WARNING):
        rows = load_rows(results)
    assert set(rows.seed) == {1, 2} and "a-list" in caplog.text


def test_the_run_summary_never_averages_a_nan_run(results):
    from benchmarks.exec.run import summarise

    text = summarise(sorted(p for p in results.iterdir() if (p / "rows.csv").exists()))
    assert "finetune" in text and "nan%" in text.splitlines()[1]  # not 80.0% or 65.0%
    assert f"damaged: {BENCH}-finetune-resnet18-paper-s2-test: accuracy not a number" in text
