"""epochs.csv: one row per (task, phase, epoch), written as the run goes, each epoch once
after a resume, recorded without a read inside the step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmarks.core.epoch_log import (
    COLUMNS,
    EpochCSV,
    EpochLog,
    EpochLosses,
    EpochRecord,
    read_epochs,
)
from benchmarks.engine.harness import RunConfig, run
from benchmarks.exec.status import folder_progress
from benchmarks.perf.opcount import OpCounter


def _record(task: int, phase_index: int, epoch: int, loss: float = 1.0) -> EpochRecord:
    return EpochRecord(task, phase_index, "train", epoch, 3, 4, loss, 0.1, 0.5, 8.0, 0)


def test_a_resume_drops_the_rows_at_or_after_the_epoch_it_trains_again(tmp_path):
    log = EpochCSV(tmp_path, ["kernels_changed"])
    for key in [(0, 0, 0), (0, 0, 1), (0, 0, 2), (1, 0, 0), (1, 0, 1), (1, 1, 0)]:
        log.append(_record(*key))
    log.resume_from(1, 0, 1)  # task 1's phase 0 resumes after its first epoch
    kept = read_epochs(tmp_path)
    assert [tuple(k) for k in kept[["task", "phase_index", "epoch"]].itertuples(index=False)] \
        == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (1, 0, 0)]
    assert list(kept.columns) == [*COLUMNS, "kernels_changed"]
    log.append(_record(1, 0, 1, loss=2.5))  # appended after the kept rows, header once
    again = read_epochs(tmp_path)
    assert len(again) == 5 and again.loss.iloc[-1] == 2.5
    assert math.isnan(again.kernels_changed.iloc[-1])  # a method without the figure: empty


def test_the_epoch_mean_leaves_out_non_finite_steps_and_counts_them():
    losses = EpochLosses(5, torch.device("cpu"))
    for i, v in enumerate([1.0, float("nan"), 3.0, float("inf"), 2.0]):
        losses.put(i, torch.tensor(v))
    mean, bad = losses.summary(5)
    assert float(mean) == 2.0 and int(bad) == 2  # (1 + 3 + 2) / 3
    assert int(losses.summary(1)[1]) == 0


def test_a_step_is_recorded_by_one_copy_on_the_device_and_no_host_read(tmp_path):
    class NoFigures:
        def epoch_state(self, model):
            return None

        def epoch_figures(self, model, state):
            return {}

    recorder = EpochLog(tmp_path).phase(0, 0, "train", NoFigures(), torch.nn.Identity())
    recorder.start(0, 1, 4, torch.device("cpu"))
    recorder.begin(0)
    loss, y = torch.tensor(0.5), torch.zeros(8, dtype=torch.long)
    recorder.step(0, loss, y)  # the first step also takes the method's epoch state
    with OpCounter() as ops:
        for i in range(1, 4):
            recorder.step(i, loss, y)
    assert ops.syncs == 0
    assert dict(ops.counts) == {"aten.select.int": 3, "aten.copy_.default": 3}  # select: a view
    recorder.end(0, 0.1)
    row = read_epochs(tmp_path).iloc[0]
    assert (row.steps, row.loss, row.nonfinite_steps, row.lr) == (4, 0.5, 0, 0.1)
    assert row.images_per_s > 0 and row.seconds >= 0


def _config(out: Path) -> RunConfig:
    return RunConfig(method="nws", benchmark="synthetic", protocol="smoke", out=str(out),
                     progress=False, num_tasks=1, deterministic=True,
                     protocol_overrides={"epochs": 3}, checkpoint_every="2")


def test_a_killed_run_keeps_its_epochs_and_the_resumed_run_records_each_once(tmp_path,
                                                                            monkeypatch):
    """NWS (k-means pools from task 0: a plain ``train`` phase, then ``nws``), killed while
    writing the ``nws`` phase's last checkpoint: its third epoch is recorded but not
    checkpointed, so the resumed run trains it again and records it once; the finished
    ``train`` phase keeps the ``nws`` rows after it. Deterministic: the same figures."""
    from benchmarks.engine import training

    whole = pd.read_csv(run(_config(tmp_path / "whole")) / "epochs.csv")
    assert [(r.phase_index, r.phase, r.epoch) for r in whole.itertuples()] == [
        (0, "train", 0), (0, "train", 1), (0, "train", 2), (1, "nws", 0), (1, "nws", 1),
        (1, "nws", 2)]
    assert whole[whole.phase == "train"].kernels_changed.isna().all()  # no NWS layers yet
    changed = whole[whole.phase == "nws"].kernels_changed
    assert ((changed >= 0) & (changed <= 1)).all() and changed.notna().all()

    save = training.save_checkpoint

    def killed_at_the_last_save(path, trainer, epochs_done, stats, running):
        if "nws" in path.name and epochs_done == 3:
            raise KeyboardInterrupt
        save(path, trainer, epochs_done, stats, running)

    monkeypatch.setattr(training, "save_checkpoint", killed_at_the_last_save)
    with pytest.raises(KeyboardInterrupt):
        run(_config(tmp_path / "resumed"))
    run_dir = next((tmp_path / "resumed").iterdir())
    assert len(read_epochs(run_dir)) == 6  # the killed run kept every epoch it finished
    monkeypatch.setattr(training, "save_checkpoint", save)
    run(_config(tmp_path / "resumed"))
    resumed = read_epochs(run_dir)
    timing = ["seconds", "images_per_s"]
    pd.testing.assert_frame_equal(resumed.drop(columns=timing), whole.drop(columns=timing))


def test_status_shows_the_last_epoch_of_an_unfinished_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"tasks": [{"index": 0}, {"index": 1}]}))
    log = EpochCSV(tmp_path)
    log.append(_record(0, 0, 0, loss=0.9))
    log.append(_record(1, 0, 1, loss=0.12345))
    status = folder_progress(tmp_path)
    assert status.state == "partial"
    assert "task 2 [train] epoch 2/3 loss 0.1235" in status.line()
