"""A run of part of a benchmark (``--tasks N``) is never shown as the paper's row unmarked."""

from __future__ import annotations

import json

import pandas as pd

from analysis import tables
from benchmarks.core.results import COLUMNS


def _write_run(root, method: str, acc: list[float], planned: int) -> None:
    """rows.csv and config.json of one CUB-to-Sketches run asked for ``planned`` tasks."""
    rid = f"cub_to_sketches-{method}-resnet18-paper-s1993-test"
    base = {"run_id": rid, "benchmark": "cub_to_sketches", "method": method,
            "arch": "resnet18", "protocol": "paper", "seed": 1993, "synthetic": False}
    rows = []
    for i in range(len(acc)):
        rows += [base | {"task": j, "task_name": f"t{j}", "after_task": i,
                         "metric": "accuracy", "value": acc[j]} for j in range(i + 1)]
        rows.append(base | {"task": i, "task_name": f"t{i}", "after_task": i,
                            "metric": "store_bytes", "value": 2**20 * (i + 1)})
    (root / rid).mkdir(parents=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(root / rid / "rows.csv", index=False)
    config = {"identity": {"options": {}}, "tasks": [{"index": t} for t in range(planned)]}
    (root / rid / "config.json").write_text(json.dumps(config))


def test_a_one_task_run_says_1_of_5_and_is_marked_beside_the_paper(tmp_path):
    runs = tmp_path / "runs"
    _write_run(runs, "finetune", [0.80], planned=1)  # --tasks 1
    _write_run(runs, "nws", [0.70, 0.80, 0.90, 0.60, 0.70], planned=5)
    out = tmp_path / "tables"
    assert tables.main(["--results", str(runs), "--out", str(out)]) == 0

    t1 = pd.read_csv(out / "table1_cub_to_sketches_paper.csv").set_index("method")
    assert t1.loc["finetune", "tasks"] == 1 and t1.loc["finetune", "benchmark_tasks"] == 5
    assert bool(t1.loc["finetune", "partial"]) and not bool(t1.loc["nws", "partial"])
    md = (out / "table1_cub_to_sketches_paper.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| Method")}
    assert "| 1/5 partial |" in rows["finetune"] and "| 5/5 |" in rows["nws"]
    paper_avg = t1.loc["finetune", "paper_acc"]
    assert f"| {paper_avg:.1f} (5 tasks) |" in rows["finetune"]  # the paper's count, said
    assert "(5 tasks)" not in rows["nws"] and "partial" not in rows["nws"]
    note = ("finetune/resnet18: partial: 1 of 5 tasks; not comparable to the paper's value "
            "(5 tasks)")
    assert f"- {note}" in md and "nws/resnet18: partial" not in md
    assert "whole benchmark (5 tasks" in md  # the memory note counts the benchmark's tasks

    md2 = (out / "table2_cub_to_sketches_paper.md").read_text()
    assert "T5" in md2  # every task of the benchmark has a column
    ours = next(line for line in md2.splitlines() if line.startswith("| finetune | ours"))
    assert "80.0 (partial: 1 of 5 tasks)" in ours and ours.count("| - ") == 4
    assert f"- {note}" in md2
