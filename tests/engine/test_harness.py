"""Harness: results and artifact stores, resume after a kill, config conflicts, Finetune."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmarks.core.results import COLUMNS, TIMING_METRICS, load_rows
from benchmarks.core.store import ArtifactStore
from benchmarks.engine.harness import RunConfig, RunConflictError, run
from tests.fakes import assert_learned, learn_split_digits

REPO = Path(__file__).resolve().parent.parent.parent
SMOKE = ["--method", "finetune", "--benchmark", "synthetic", "--protocol", "smoke",
         "--deterministic", "--no-progress", "--seeds", "7"]


def _cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.run", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _blobs(run_dir: Path) -> dict:
    store = ArtifactStore(run_dir / "artifacts")
    return {(t, n): store.get_bytes(n, t) for t in store.tasks() for n in store.names(t)}


def test_killed_run_resumes_to_exactly_the_uninterrupted_results(tmp_path):
    whole = _cli([*SMOKE, "--out", str(tmp_path / "whole")])
    out, _ = whole.communicate(timeout=300)
    assert whole.returncode == 0, out

    killed = _cli([*SMOKE, "--out", str(tmp_path / "resumed")])
    for line in killed.stdout:  # kill -9 as soon as the first task is reported
        if "task 1/3" in line:
            killed.kill()
            break
    killed.wait(timeout=60)
    run_dir = next((tmp_path / "resumed").iterdir())
    assert set(load_rows(run_dir).task) == {0}  # only task 0 was finished

    again = _cli([*SMOKE, "--out", str(tmp_path / "resumed")])
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "task 1/3" not in out  # task 0 was not learned again

    a, b = load_rows(tmp_path / "whole"), load_rows(tmp_path / "resumed")
    key = ["task", "after_task", "metric"]
    keep = ~a.metric.isin(TIMING_METRICS)
    a = a[keep].sort_values(key).reset_index(drop=True)
    b = b[~b.metric.isin(TIMING_METRICS)].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    whole_dir = next((tmp_path / "whole").iterdir())
    assert _blobs(whole_dir) == _blobs(run_dir)  # bit-identical stored models


def test_rows_are_tidy_and_the_accuracy_matrix_is_complete(tmp_path):
    cfg = RunConfig(method="finetune", benchmark="synthetic", protocol="smoke",
                    out=str(tmp_path), progress=False)
    run_dir = run(cfg)
    df = pd.read_csv(run_dir / "rows.csv")
    assert list(df.columns) == COLUMNS
    assert df.synthetic.all()  # a synthetic run says so on every row
    acc = df[df.metric == "accuracy"]
    assert sorted(zip(acc.after_task, acc.task, strict=True)) == [
        (0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    assert acc.value.between(0, 1).all()
    store = ArtifactStore(run_dir / "artifacts")
    last = df[(df.metric == "store_bytes") & (df.after_task == 2)].value.item()
    assert last == store.total_bytes()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["protocol_provenance"]["lr"].startswith("paper")
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    policy = env["device_policy"]  # the device policy's cuDNN/TF32 decisions and the flags
    assert (policy["cudnn_benchmark"], policy["tf32"]) == (False, False)  # CPU: both off
    assert policy["backend_flags"]["cudnn_benchmark"] is False


def test_a_committed_but_unevaluated_task_is_evaluated_not_retrained(tmp_path):
    cfg = RunConfig(method="finetune", benchmark="synthetic", protocol="smoke",
                    out=str(tmp_path), progress=False, num_tasks=2)
    run_dir = run(cfg)
    before = _blobs(run_dir)
    rows = pd.read_csv(run_dir / "rows.csv")
    rows[rows.after_task == 0].to_csv(run_dir / "rows.csv", index=False)  # as if killed
    run(cfg)
    assert _blobs(run_dir) == before
    again = pd.read_csv(run_dir / "rows.csv")
    assert set(again.metric) == set(rows.metric) and "task_seconds" in set(rows.metric)
    again, rows = (x[~x.metric.isin(["task_seconds"])] for x in (again, rows))
    pd.testing.assert_frame_equal(  # train_seconds: the stored task's own, read again
        again.sort_values(["after_task", "task", "metric"]).reset_index(drop=True),
        rows.sort_values(["after_task", "task", "metric"]).reset_index(drop=True))


def test_a_changed_configuration_does_not_resume_into_an_old_run(tmp_path):
    cfg = RunConfig(method="finetune", benchmark="synthetic", protocol="smoke",
                    out=str(tmp_path), progress=False, num_tasks=1)
    run_dir = run(cfg)
    config = json.loads((run_dir / "config.json").read_text())
    config["identity"]["protocol"]["lr"] = 0.5  # as if the protocol changed in the code
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunConflictError, match="another configuration"):
        run(cfg)


@pytest.mark.slow
def test_finetune_learns_split_digits_from_the_store(tmp_path):
    """Bars: tests/fakes.py ``assert_learned`` (each task >= 65%, mean >= 85%). Measured
    2026-12-03, per run the lowest task / the mean (seed / ATEN_CPU_CAPABILITY / threads):
    96.7/98.8% (1993/avx2/1), 94.9/98.6% (1993/avx2/2), 94.2/97.8% (1993/default/1),
    97.5/98.7% (1994/avx2/1), 94.1/98.0% (1995/default/1), 78.5/94.5% (1996/avx2/1); and
    88.3% lowest (1993 on an AVX2-only AMD EPYC, issue 21). Lowest task 78.5%, mean 94.5%."""
    df = load_rows(learn_split_digits("finetune", tmp_path))
    own = df[(df.metric == "accuracy") & (df.task == df.after_task)]
    assert len(own) == 5
    assert_learned(own.set_index("task_name").value)
    final = df[(df.metric == "accuracy") & (df.after_task == 4)]
    assert (final.set_index("task").value == own.set_index("task").value).all()  # no forgetting


def _steps_per_task(run_dir: Path) -> list[int]:
    rows = load_rows(run_dir)
    own = rows[(rows.metric == "train_steps")].sort_values("task")
    return [int(v) for v in own.value]


@pytest.mark.parametrize(("method", "num_tasks"), [("finetune", 2), ("packnet", 1), ("nws", 1),
                                                  ("ksm", 1), ("aqd", 1)])
def test_a_run_killed_mid_task_resumes_after_its_last_epoch(tmp_path, monkeypatch, method,
                                                            num_tasks):
    """Killed in the last epoch of the last task's last training phase: the resumed run
    restores the finished phases and epochs from their checkpoints, replays what the method
    does between phases (PackNet's pruning; NWS's k-means pools after task 0's plain phase),
    trains only the lost epoch, and ends bit-identical to an uninterrupted run. (AQD failed
    this until its LSQ init flag went into the state dict: resumed, it re-initialised its
    activation scales from data.)"""
    from benchmarks.engine import training

    def config(out: Path) -> RunConfig:
        return RunConfig(method=method, benchmark="synthetic", protocol="smoke", out=str(out),
                         progress=False, num_tasks=num_tasks, deterministic=True,
                         protocol_overrides={"epochs": 3}, checkpoint_every="1")

    whole = run(config(tmp_path / "whole"))
    kill_after = sum(_steps_per_task(whole)) - 2
    step, calls = training.Trainer.step, [0]

    def counted(self, x, y):
        calls[0] += 1
        if calls[0] > kill_after:
            raise KeyboardInterrupt  # as if killed in the phase's last epoch (2 steps)
        return step(self, x, y)

    monkeypatch.setattr(training.Trainer, "step", counted)
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path / "resumed"))
    run_dir = next((tmp_path / "resumed").iterdir())
    assert list((run_dir / "checkpoints").glob("task*.pt"))  # finished epochs were kept
    calls[0], kill_after = 0, 10**9
    run(config(tmp_path / "resumed"))
    assert calls[0] == 2  # only the lost epoch was trained again
    assert not list((run_dir / "checkpoints").glob("*"))  # removed once tasks are stored
    assert _blobs(whole) == _blobs(run_dir)
    a, b = (load_rows(d) for d in (whole, run_dir))
    a, b = (x[~x.metric.isin(TIMING_METRICS)].sort_values(["after_task", "task", "metric"])
            .drop(columns="run_id").reset_index(drop=True) for x in (a, b))
    pd.testing.assert_frame_equal(a, b)


def test_eta_leaves_out_the_first_tasks_one_time_costs():
    from benchmarks.engine.harness import _eta

    assert _eta([60.0], 4) == 240.0  # only the first task known: it is all there is
    assert _eta([60.0, 7.0, 9.0], 3) == 24.0  # then the later tasks' mean
    assert _eta([60.0, 7.0], 0) == 0.0
