"""Tables and figures gather the runs of one experiment (identity equal but for the seed).

Run folders are written with the suite's own writers (the harness's ``run_identity`` and
``run_id``, :class:`benchmarks.core.results.ResultsStore`), one per identity field that splits a
group, plus the fields that do not (device type, ``--deterministic``, file digests) and
duplicates (two folders of one run, e.g. results gathered from two machines).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from analysis import figures, tables
from analysis.metrics import paired_comparison, per_seed
from analysis.runs import load_runs
from benchmarks.core.identity import run_id
from benchmarks.core.protocols import resolve_protocol
from benchmarks.core.results import SCHEMA_VERSION, ResultsStore, load_rows
from benchmarks.engine.harness import RunConfig, run_identity
from benchmarks.methods.table import METHODS

BENCH = "split_cifar100"  # default pretrained source: imagenet; NWS's default beta: 0.5


def write_run(root: Path, method: str, seed: int, acc: list[float], *,
              options: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
              pretrained: str | None = None, num_tasks: int | None = None,
              bench_opts: dict[str, Any] | None = None, search: str | None = None,
              device: str = "cpu", deterministic: bool = False,
              extra: dict[str, Any] | None = None) -> Path:
    """One run folder as the harness writes it: config.json's identity and rows.csv with
    R[i][j] = acc[j] for every i >= j (one store_bytes row per task)."""
    cfg = RunConfig(method=method, benchmark=BENCH, protocol="paper", seed=seed,
                    pretrained=pretrained, num_tasks=num_tasks, device=device,
                    deterministic=deterministic, method_options=options or {},
                    protocol_overrides=overrides or {}, benchmark_options=bench_opts or {},
                    search=search)
    cls = METHODS.get(method)
    protocol = resolve_protocol("paper", BENCH)
    if overrides:
        protocol = protocol.with_overrides(**overrides)
    identity = run_identity(cfg, protocol, cls.resolve_options(BENCH, options or {}),
                            pretrained or "imagenet", torch.device(device), cls)
    default_search = "certificates" if device == "cpu" else "full"  # nws.search's rule
    identity |= {f"policy_{k}": search or default_search for k in cls.policy_fields}
    identity |= extra or {}
    rid = run_id(cfg, identity, cls.resolve_options(BENCH, {}))
    store = ResultsStore(root / rid)
    store.write_json("config.json", {"identity": identity, "run_id": rid,
                                     "run_config": asdict(cfg)})
    base = {"run_id": rid, "benchmark": BENCH, "method": method, "arch": "resnet18",
            "protocol": "paper", "seed": seed, "synthetic": False}
    rows = []
    for i in range(len(acc)):
        rows += [base | {"task": j, "task_name": f"t{j}", "after_task": i,
                         "metric": "accuracy", "value": acc[j]} for j in range(i + 1)]
        rows.append(base | {"task": i, "task_name": f"t{i}", "after_task": i,
                            "metric": "store_bytes", "value": 2**20 * (i + 1)})
    store.append(rows)
    return store.dir


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Defaults (2 seeds each), and one run per identity field that splits a group."""
    root = tmp_path / "runs"
    write_run(root, "nws", 1993, [0.70, 0.80])
    write_run(root, "nws", 1994, [0.74, 0.84])
    write_run(root, "finetune", 1993, [0.60, 0.60])
    write_run(root, "finetune", 1994, [0.64, 0.62])
    write_run(root, "nws", 1993, [0.50, 0.50], options={"beta": 0.1})  # method option
    write_run(root, "nws", 1993, [0.52, 0.52], options={"codec": "delta"})  # a variant
    # the search path (CPU's default: certificates) is not in the run id: another --out
    write_run(root / "full", "nws", 1993, [0.54, 0.54], search="full")
    write_run(root, "finetune", 1993, [0.40, 0.40], overrides={"lr": 0.5, "epochs": 2})
    write_run(root, "finetune", 1993, [0.30, 0.30], pretrained="none")
    write_run(root, "finetune", 1993, [0.20], num_tasks=1)
    write_run(root, "finetune", 1993, [0.10, 0.10], bench_opts={"layout": "b"})
    return root


EXPECTED = {  # label -> (seeds, mean accuracy %)
    "nws": (2, 77.0), "finetune": (2, 61.5), "nws (beta=0.1)": (1, 50.0),
    "nws-delta": (1, 52.0), "nws (search=full)": (1, 54.0),
    "finetune (epochs=2, lr=0.5)": (1, 40.0), "finetune (pretrained=none)": (1, 30.0),
    "finetune (tasks=1)": (1, 20.0), "finetune (layout=b)": (1, 10.0),
}


def test_each_identity_field_is_its_own_row_labelled_by_what_differs(results, tmp_path):
    runs = load_runs(results)
    assert {r.method for r in runs} == set(EXPECTED)
    out = tmp_path / "tables"
    assert tables.main(["--results", str(results), "--out", str(out)]) == 0
    t1 = pd.read_csv(out / f"table1_{BENCH}_paper.csv").set_index("method")
    for label, (seeds, acc) in EXPECTED.items():
        assert t1.loc[label, "seeds"] == seeds, label
        assert t1.loc[label, "acc_mean"] == pytest.approx(acc), label
    # the paper's figures stand beside the default rows only
    assert t1.loc["finetune", "paper_acc"] > 0
    assert pd.isna(t1.loc["finetune (pretrained=none)", "paper_acc"])
    # ... and beside a partial run of the defaults, which says it is partial
    assert t1.loc["finetune (tasks=1)", "paper_acc"] == t1.loc["finetune", "paper_acc"]
    assert t1.loc["finetune (tasks=1)", "partial"]
    # rows of one method stay together, its defaults first
    order = list(t1.index)
    ft = [i for i, m in enumerate(order) if m.startswith("finetune")]
    assert order[ft[0]] == "finetune" and ft == list(range(ft[0], ft[0] + len(ft)))


def test_the_default_search_of_each_device_is_no_difference(tmp_path):
    """certificates on CPU and full on CUDA are each device's default: both plain ``nws``,
    yet two rows (other search paths); the label says which path where they meet."""
    root = tmp_path / "runs"
    write_run(root, "nws", 1993, [0.7, 0.8])
    write_run(root, "nws", 1994, [0.7, 0.8], device="cuda")
    write_run(root, "nws", 1995, [0.7, 0.8], device="cuda", search="full")  # declared, same
    labels = sorted((r.method, r.seed) for r in load_runs(root))
    assert labels == [("nws (search=certificates)", 1993), ("nws (search=full)", 1994),
                      ("nws (search=full)", 1995)]


def test_table2_shows_the_cells_of_the_seeds_it_counts(results, tmp_path):
    out = tmp_path / "tables"
    tables.main(["--results", str(results), "--out", str(out)])
    md = (out / f"table2_{BENCH}_paper.md").read_text()
    row = next(x for x in md.splitlines() if x.startswith("| finetune | ours"))
    assert "ours (seeds: 2)" in row and "62.0 ± 2.8" in row  # T1: 60 and 64
    row = next(x for x in md.splitlines() if x.startswith("| finetune (pretrained=none) |"))
    assert "ours (seeds: 1)" in row and "| 30.0 |" in row
    t2 = pd.read_csv(out / f"table2_{BENCH}_paper.csv")
    cell = t2[(t2.method == "finetune") & (t2.task == 0)].iloc[0]
    assert cell.seeds == 2 and cell.acc_mean == pytest.approx(62.0)


def test_two_nws_settings_of_one_seed_beside_a_baseline_make_tables(tmp_path):
    """The case that crashed paired_comparison (a non-unique index) before."""
    root = tmp_path / "runs"
    write_run(root, "nws", 1993, [0.70, 0.80], options={"beta": 0.5})
    write_run(root, "nws", 1993, [0.60, 0.70], options={"beta": 0.1})
    write_run(root, "finetune", 1993, [0.60, 0.60])
    out = tmp_path / "tables"
    assert tables.main(["--results", str(root), "--out", str(out)]) == 0
    pairs = pd.read_csv(out / f"pairs_{BENCH}_paper.csv")
    got = dict(zip(pairs.baseline, pairs.mean_diff, strict=True))
    assert got["finetune"] == pytest.approx(0.15)  # nws (beta 0.5 = default) 75 - 60
    assert got["nws (beta=0.1)"] == pytest.approx(0.10)
    assert (pairs.seeds == 1).all()


def test_device_type_deterministic_and_digests_do_not_split_but_are_noted(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "finetune", 1993, [0.60, 0.60])
    write_run(root, "finetune", 1994, [0.64, 0.62], device="meta", deterministic=True,
              extra={"data_digest": "ab12", "digests": {"train.npz": "cd34"}})
    out = tmp_path / "tables"
    tables.main(["--results", str(root), "--out", str(out)])
    t1 = pd.read_csv(out / f"table1_{BENCH}_paper.csv").set_index("method")
    assert t1.loc["finetune", "seeds"] == 2
    md = (out / f"table1_{BENCH}_paper.md").read_text()
    assert "finetune/resnet18: seeds mix device types (cpu: seeds [1993]; meta: seeds [1994])" \
        in md
    assert "finetune/resnet18: seeds mix --deterministic (False: seeds [1993]; True: seeds " \
        "[1994])" in md


def test_duplicates_keep_the_most_complete_and_say_so(tmp_path, caplog):
    root = tmp_path / "runs"
    write_run(root, "nws", 1994, [0.74, 0.84])
    write_run(root / "machine_a", "nws", 1993, [0.70])  # stopped after one task
    whole = write_run(root / "machine_b", "nws", 1993, [0.70, 0.80])
    write_run(root, "finetune", 1993, [0.60, 0.60])
    write_run(root, "finetune", 1994, [0.64, 0.62])
    with caplog.at_level(logging.WARNING):
        runs = load_runs(root)
    nws = [r for r in runs if r.method == "nws"]
    assert sorted(r.seed for r in nws) == [1993, 1994]
    assert next(r for r in nws if r.seed == 1993).dir == whole
    assert f"kept {whole} (2 tasks learned), left out {root / 'machine_a'}" in caplog.text
    out = tmp_path / "tables"
    assert tables.main(["--results", str(root), "--out", str(out)]) == 0
    t1 = pd.read_csv(out / f"table1_{BENCH}_paper.csv").set_index("method")
    assert t1.loc["nws", "seeds"] == 2 and t1.loc["nws", "acc_mean"] == pytest.approx(77.0)
    md = (out / f"table1_{BENCH}_paper.md").read_text()
    assert "nws/resnet18 seed 1993: 2 runs of the same settings and seed; kept" in md
    assert "(duplicates are never averaged)" in md
    pairs = pd.read_csv(out / f"pairs_{BENCH}_paper.csv")
    assert pairs.set_index("baseline").loc["finetune", "seeds"] == 2


def test_paired_comparison_of_duplicate_seed_rows_uses_one_and_warns(caplog):
    seeds = pd.DataFrame({
        "benchmark": "b", "arch": "a", "protocol": "p", "tasks": 2,
        "method": ["nws", "nws", "finetune"], "run_id": ["r1", "r2", "r3"],
        "seed": [1, 1, 1], "avg_accuracy": [0.8, 0.6, 0.5]})
    with caplog.at_level(logging.WARNING):
        p = paired_comparison(seeds)
    assert p.iloc[0].mean_diff == pytest.approx(0.3)  # the first nws row, not the mean 0.7
    assert "r2" in caplog.text


def test_figures_draw_one_series_per_experiment(results, tmp_path):
    runs = load_runs(results)
    frame = figures.task_accuracy_frame(runs)
    assert set(frame.method) == {r.method for r in runs}
    assert len(frame[frame.method == "nws (beta=0.1)"]) == 2  # one seed x two tasks
    files, _ = figures.build_figures(results, tmp_path / "figures", BENCH)
    assert any(f.name == f"accuracy_matrix_{BENCH}_paper.png" for f in files)
    seeds = per_seed(pd.concat([r.rows for r in runs]))
    assert seeds.groupby("method").seed.nunique().to_dict() == \
        seeds.groupby("method").size().to_dict()


def test_labels_of_groups_alike_by_the_rules_name_what_differs(tmp_path):
    """Two code versions with another default learning rate, neither set by --set."""
    root = tmp_path / "runs"
    write_run(root, "finetune", 1993, [0.6, 0.6])
    other = write_run(root, "finetune", 1994, [0.5, 0.5], extra={})
    cfg = json.loads((other / "config.json").read_text())
    cfg["identity"]["protocol"]["lr"] = 0.25
    (other / "config.json").write_text(json.dumps(cfg))
    assert sorted(r.method for r in load_runs(root)) == ["finetune (lr=0.01)",
                                                         "finetune (lr=0.25)"]


def test_rows_carry_a_schema_version_and_settings_on_request(results, tmp_path):
    rows = load_rows(results)
    assert (rows.schema == SCHEMA_VERSION).all()
    one = next(results.glob("*-finetune-*"))
    old = pd.read_csv(one / "rows.csv").drop(columns="schema")  # a file of version 1
    old.to_csv(one / "rows.csv", index=False)
    assert set(load_rows(one).schema) == {1}
    full = load_rows(results, with_config=True)
    beta = full[full["config.options.beta"] == 0.1]
    assert set(beta.run_id) == {r.run_id for r in load_runs(results)
                                if r.method == "nws (beta=0.1)"}
    assert set(full["config.device_type"]) == {"cpu"}
    groups = full.groupby("config.group").seed.nunique()
    assert sorted(groups) == [1] * 7 + [2, 2]


def test_real_smoke_runs_are_labelled_by_their_command_line(tmp_path):
    """Through the harness itself: a default run and a ``--set lr=0.5`` run of one seed."""
    from benchmarks.engine.harness import run

    base = dict(method="finetune", benchmark="synthetic", protocol="smoke", num_tasks=1,
                out=str(tmp_path), progress=False, device="cpu")
    run(RunConfig(**base))
    run(RunConfig(**base, protocol_overrides={"lr": 0.5}))
    assert sorted(r.method for r in load_runs(tmp_path)) == ["finetune (tasks=1)",
                                                             "finetune (tasks=1, lr=0.5)"]
