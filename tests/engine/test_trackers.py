"""--logger: TensorBoard event files hold what epochs.csv and rows.csv hold; W&B is offline
without a key; a missing extra exits 2 before any run folder; the flag is not identity."""

from __future__ import annotations

import sys
import types

import pandas as pd
import pytest

from benchmarks.core.epoch_log import EpochRecord
from benchmarks.core.results import load_rows
from benchmarks.engine import trackers
from benchmarks.engine.harness import RunConfig, run
from benchmarks.exec import run as cli


def _config(out, loggers):
    return RunConfig(method="finetune", benchmark="synthetic", protocol="smoke", out=str(out),
                     progress=False, num_tasks=2, loggers=loggers,
                     protocol_overrides={"epochs": 2})


def test_tensorboard_events_read_back_equal_the_run_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = run(_config(tmp_path, ["tensorboard", "csv"]))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    epochs = pd.read_csv(run_dir / "epochs.csv")
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(len(epochs))) == [0, 1, 2, 3]  # 2 tasks x 2
    assert [e.value for e in loss] == pytest.approx(list(epochs.loss), rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx(list(epochs.lr))
    rows = load_rows(run_dir)
    acc = rows[(rows.metric == "accuracy") & (rows.after_task == 1)].set_index("task").value
    for j in (0, 1):
        (last,) = [e for e in events.Scalars(f"accuracy/task{j + 1}") if e.step == 2]
        assert last.value == pytest.approx(100 * acc[j], rel=1e-6)
    stored = rows[(rows.metric == "store_bytes")].sort_values("after_task").value
    assert [e.value for e in events.Scalars("memory/store_MiB")] == pytest.approx(
        list(stored / 2**20))
    # --logger is not the run's identity: without it the same folder is found (and done)
    assert run(_config(tmp_path, [])) == run_dir


def test_a_missing_extra_exits_2_naming_it_before_any_run_folder(tmp_path, monkeypatch,
                                                                  capsys):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "runs"
    code = cli.main(["--method", "finetune", "--benchmark", "synthetic", "--protocol", "smoke",
                     "--logger", "wandb", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--logger wandb needs the wandb package" in err and "nws-bench[track]" in err
    assert not out.exists()
    assert cli.main(["--method", "finetune", "--logger", "mlflow", "--out", str(out)]) == 2
    assert "valid loggers: csv, tensorboard, wandb" in capsys.readouterr().err


class _FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, values):
        self.logged.append(values)

    def finish(self):
        self.finished = True


@pytest.mark.parametrize(("key", "mode"), [(None, "offline"), ("k", "online")])
def test_wandb_is_offline_without_a_key(tmp_path, monkeypatch, key, mode):
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: _FakeRun(**kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    else:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    tracker = trackers.WandbTracker(tmp_path, "rid", {"seed": 1})
    assert tracker.run.kwargs["mode"] == mode and tracker.run.kwargs["id"] == "rid"
    tracker.epoch(EpochRecord(0, 0, "train", 0, 1, 2, 0.5, 0.1, 1.0, 8.0, 0,
                              {"kernels_changed": float("nan")}))
    tracker.task(0, [{"task": 0, "metric": "accuracy", "value": 0.75},
                     {"task": 0, "metric": "store_bytes", "value": 2**20}])
    tracker.close()
    assert tracker.run.logged[0] == {"train/loss": 0.5, "train/lr": 0.1,
                                     "train/images_per_s": 8.0, "train/nonfinite_steps": 0.0,
                                     "epoch": 0}  # a NaN figure is left out
    assert tracker.run.logged[1] == {"accuracy/task1": 75.0, "accuracy/mean": 75.0,
                                     "memory/store_MiB": 1.0, "tasks_learned": 1}
    assert tracker.run.finished
