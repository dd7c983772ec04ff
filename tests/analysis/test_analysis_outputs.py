"""Tables and figures from a small results store written by hand in the test."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import analysis.runs
from analysis import figures, tables
from benchmarks.core.results import COLUMNS
from benchmarks.core.store import ArtifactStore

LAYERS = {"conv1": 12, "layer1.0.conv1": 16, "fc": 10}  # layer -> kernels
POOL = 8


def _write_run(root, benchmark: str, method: str, seed: int, acc: list[float],
               store_mib: float) -> None:
    """rows.csv of one run: R[i][j] = acc[j] for every i >= j, and store_bytes per task."""
    rid = f"{benchmark}-{method}-resnet18-paper-s{seed}-test"
    base = {"run_id": rid, "benchmark": benchmark, "method": method, "arch": "resnet18",
            "protocol": "paper", "seed": seed, "synthetic": False}
    rows = []
    for i in range(len(acc)):
        rows += [base | {"task": j, "task_name": f"t{j}", "after_task": i,
                         "metric": "accuracy", "value": acc[j]} for j in range(i + 1)]
        rows.append(base | {"task": i, "task_name": f"t{i}", "after_task": i,
                            "metric": "store_bytes", "value": store_mib * 2**20 * (i + 1)})
    (root / rid).mkdir(parents=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(root / rid / "rows.csv", index=False)


def _write_indices(run_dir, tasks: int) -> None:
    """A hand-made NWS artifact store: one int64 blob of indices per layer and task."""
    store = ArtifactStore(run_dir / "artifacts")
    rng = np.random.default_rng(0)
    for t in range(tasks):
        with store.transaction() as tx:
            for name, d in LAYERS.items():
                tx.put_tensor(f"idx:{name}", torch.from_numpy(rng.integers(0, POOL, d)), task=t)


def _fake_hook(method: str, hook: str):
    if method != "nws":
        return None
    if hook == "pool_size":
        return POOL
    if hook == "task_indices":
        return lambda store, t: {n: store.get_tensor(f"idx:{n}", t).numpy() for n in LAYERS}
    return None


def _results(root, benchmark: str):
    _write_run(root, benchmark, "nws", 1993, [0.70, 0.80], 1.0)
    _write_run(root, benchmark, "nws", 1994, [0.74, 0.84], 1.0)
    _write_run(root, benchmark, "finetune", 1993, [0.60, 0.60], 40.0)
    _write_run(root, benchmark, "finetune", 1994, [0.64, 0.62], 40.0)
    for d in root.glob("*-nws-*"):
        _write_indices(d, tasks=2)
    return root


def test_tables_from_hand_written_store(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(analysis.runs, "method_hook", _fake_hook)
    results = _results(tmp_path / "runs", "split_cifar100")  # the paper's Table 1 benchmark
    out = tmp_path / "tables"
    assert tables.main(["--results", str(results), "--benchmark", "split_cifar100",
                        "--out", str(out)]) == 0
    t1 = pd.read_csv(out / "table1_split_cifar100_paper.csv").set_index("method")
    # nws: seed means (0.70+0.80)/2 = 75% and (0.74+0.84)/2 = 79% -> 77.0 ± 2.83
    assert t1.loc["nws", "acc_mean"] == pytest.approx(77.0)
    assert t1.loc["nws", "acc_std"] == pytest.approx(np.std([75, 79], ddof=1))
    assert t1.loc["finetune", "acc_mean"] == pytest.approx((60 + 63) / 2)
    assert t1.loc["nws", "paper_acc"] == 73.4 and t1.loc["nws", "paper_mib"] == 33.9
    assert t1.loc["nws", "stored_mib"] == pytest.approx(2.0)  # after task 2
    assert t1.loc["nws", "forgetting"] == 0 and t1.loc["nws", "tasks"] == 2
    assert t1.loc["ksm", "seeds"] == 0  # no run: reported, never filled in
    md = (out / "table1_split_cifar100_paper.md").read_text()
    assert "77.0 ± 2.8" in md and "ksm/resnet18: no run" in md and "2/20 tasks" in md
    assert r"\begin{tabular}" in (out / "table1_split_cifar100_paper.tex").read_text()
    pairs = pd.read_csv(out / "pairs_split_cifar100_paper.csv").set_index("baseline")
    assert pairs.loc["finetune", "mean_diff"] == pytest.approx(((0.75 - 0.60) + (0.79 - 0.63)) / 2)
    t2 = pd.read_csv(out / "table2_split_cifar100_paper.csv")
    row = t2[(t2.method == "nws") & (t2.task == 1)].iloc[0]
    assert row.acc_mean == pytest.approx(82.0) and row.seeds == 2
    bits = pd.read_csv(out / "bits_split_cifar100_paper.csv")
    assert list(bits.indices) == [38, 38]
    for name in ("table3", "table2", "table1"):
        assert (out / f"{name}_split_cifar100_paper.md").stat().st_size > 0


def test_figures_from_hand_written_store(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(analysis.runs, "method_hook", _fake_hook)
    results = _results(tmp_path / "runs", "split_digits")  # 5 tasks: a cheap memory plot
    out = tmp_path / "figures"
    files, messages = figures.build_figures(results, out, "split_digits")
    names = {p.name for p in files}
    for stem in ("fig3_split_digits_paper", "fig4_split_digits_paper",
                 "accuracy_matrix_split_digits_paper", "memory_growth_split_digits_resnet18"):
        for ext in ("png", "pdf"):
            assert f"{stem}.{ext}" in names
            assert (out / f"{stem}.{ext}").stat().st_size > 0
    kernels = pd.read_csv(out / "fig4_split_digits_paper.csv")
    assert len(kernels) == 2 * 2 * len(LAYERS)  # seeds x tasks x layers
    assert kernels.kur.between(0, 1).all() and not messages


def test_nothing_to_show_exits_zero(tmp_path, capsys) -> None:
    assert tables.main(["--results", str(tmp_path / "none"), "--benchmark", "split_digits",
                        "--out", str(tmp_path / "t")]) == 0
    assert figures.main(["--results", str(tmp_path / "none"), "--out", str(tmp_path / "f")]) == 0
    assert "nothing to show" in capsys.readouterr().out
    assert not (tmp_path / "t").exists() and not (tmp_path / "f").exists()


def test_delta_coded_nws_runs_are_their_own_row_beside_nws(tmp_path, monkeypatch) -> None:
    """A run with codec=delta is ``nws-delta`` (the suite's extension), never pooled with NWS's
    own runs; its store still feeds KUR and layer sparsity."""
    import json

    monkeypatch.setattr(analysis.runs, "method_hook", _fake_hook)
    results = _results(tmp_path / "runs", "split_cifar100")
    _write_run(results, "split_cifar100", "nws", 1995, [0.70, 0.80], 0.25)
    delta = next(results.glob("*-nws-*-s1995-*"))
    (delta / "config.json").write_text(json.dumps({"identity": {"options": {"codec": "delta"}}}))
    _write_indices(delta, tasks=2)
    out = tmp_path / "tables"
    assert tables.main(["--results", str(results), "--out", str(out)]) == 0
    t1 = pd.read_csv(out / "table1_split_cifar100_paper.csv")
    assert list(t1.method[:3]) == ["finetune", "nws", "nws-delta"]  # side by side
    t1 = t1.set_index("method")
    assert t1.loc["nws", "seeds"] == 2 and t1.loc["nws", "acc_mean"] == pytest.approx(77.0)
    assert t1.loc["nws-delta", "seeds"] == 1 and t1.loc["nws-delta", "stored_mib"] == 0.5
    assert np.isnan(t1.loc["nws-delta", "paper_acc"])  # not the paper's method
    assert "nws-delta (suite's extension" in (out / "table1_split_cifar100_paper.md").read_text()
    runs = analysis.runs.load_runs(results)
    assert len(figures.kernel_frame(runs)) == 3 * 2 * len(LAYERS)  # seeds x tasks x layers
    files, _ = figures.build_figures(results, tmp_path / "figures", "split_cifar100")
    assert "memory_growth_split_cifar100_resnet18.png" in {p.name for p in files}
