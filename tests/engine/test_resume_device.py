"""Resume off the CPU (emulated on CPU): checkpoints are read on the CPU and then placed,
only the training device's RNG state travels, the device type is part of the run identity,
an empty loss-scaler state loads into an enabled scaler; checkpoint intervals."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from benchmarks.core.protocols import resolve_protocol
from benchmarks.core.results import TIMING_METRICS, load_rows
from benchmarks.core.store import ArtifactStore
from benchmarks.engine import checkpoints, training
from benchmarks.engine.checkpoints import CheckpointPolicy
from benchmarks.engine.harness import RunConfig, RunConflictError, run
from benchmarks.engine.training import FitStats, Trainer


class _Plain:
    """The least of a Method that Trainer and fit need: plain training."""

    optimizer_weight_decay = True

    def parameters(self, model: nn.Module):
        return model.parameters()

    def extra_loss(self, model: nn.Module) -> None:
        return None

    def after_backward(self, model: nn.Module) -> None:
        pass

    def after_step(self, model: nn.Module) -> None:
        pass


def _trainer(device: str = "cpu") -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    trainer = Trainer(model, _Plain(), resolve_protocol("smoke", "synthetic"),
                      torch.device("cpu"))
    trainer.device = torch.device(device)
    return trainer


def _checkpoint(tmp_path: Path) -> Path:
    trainer = _trainer()
    trainer.model(torch.randn(5, 4)).sum().backward()
    trainer.opt.step()  # an optimiser state to restore (momentum buffers)
    path = tmp_path / "phase.pt"
    torch.manual_seed(123)
    checkpoints.save_checkpoint(path, trainer, 1, FitStats(steps=3), torch.tensor(0.5))
    return path


def test_the_old_load_onto_the_training_device_crashed_as_on_cuda(tmp_path):
    """What happened on every CUDA resume: ``map_location=<device>`` moved the RNG states off
    the CPU (meta stands for the GPU here) and ``torch.set_rng_state`` refused them."""
    state = torch.load(_checkpoint(tmp_path), map_location=torch.device("meta"),
                       weights_only=False)
    with pytest.raises((TypeError, RuntimeError)):
        torch.set_rng_state(state["rng"]["torch"])


def test_a_checkpoint_resumes_on_a_trainer_off_the_cpu(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path)
    expected_rng = torch.load(path, weights_only=False)["rng"]["torch"]
    seen = []
    real_load = torch.load

    def load(f, map_location=None, **kw):  # anything not read onto the CPU lands on "the GPU"
        seen.append(map_location)
        cpu = map_location == "cpu" or map_location == torch.device("cpu")
        return real_load(f, map_location=map_location if cpu else torch.device("meta"), **kw)

    monkeypatch.setattr(training.torch, "load", load)
    trainer = _trainer("meta")  # the training device is not the CPU
    stats = FitStats()
    first, running = checkpoints.load_checkpoint(path, trainer, stats)
    assert seen == ["cpu"]
    assert (first, float(running), stats.steps) == (1, 0.5, 3)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert trainer.opt.state_dict()["state"]  # momentum restored


def test_only_the_training_devices_rng_state_is_saved_and_restored(monkeypatch):
    """A GPU run saves ``get_rng_state(its device)``, never every visible GPU's: resumed with
    fewer GPUs visible (or on another index) the state still restores."""
    calls = []

    class FakeCuda:
        @staticmethod
        def get_rng_state(device):
            calls.append(("get", str(device)))
            return torch.tensor([7], dtype=torch.uint8)

        @staticmethod
        def set_rng_state(state, device):
            calls.append(("set", str(device), int(state[0])))

        @staticmethod
        def get_rng_state_all():
            raise AssertionError("all devices' states are never saved")

    monkeypatch.setattr(checkpoints, "device_rng",
                        lambda d: FakeCuda if d.type == "cuda" else None)
    state = checkpoints.rng_state(torch.device("cuda:1"))
    assert state["device_type"] == "cuda" and calls == [("get", "cuda:1")]
    checkpoints.set_rng_state(state, torch.device("cuda:0"))  # requeued onto another GPU
    assert calls[-1] == ("set", "cuda:0", 7)


def test_an_empty_scaler_state_loads_into_an_enabled_scaler(tmp_path):
    """A CPU checkpoint's (disabled) scaler state is {}; an enabled fp16 scaler starts fresh
    instead of raising."""
    path = _checkpoint(tmp_path)
    trainer = _trainer()
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=True)
    assert torch.load(path, weights_only=False)["scaler"] == {}
    first, _ = checkpoints.load_checkpoint(path, trainer, FitStats())
    assert first == 1 and trainer.scaler.is_enabled()


def _cfg(out: Path, **kw) -> RunConfig:
    return RunConfig(method="finetune", benchmark="synthetic", protocol="smoke", out=str(out),
                     progress=False, num_tasks=1, **kw)


def test_a_resume_on_another_device_type_is_refused_with_the_way_out(tmp_path):
    run_dir = run(_cfg(tmp_path))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["identity"]["device_type"] == "cpu"
    config["identity"]["device_type"] = "cuda"  # as if started on a GPU
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunConflictError, match=r"started on a cuda device.*--device cuda"):
        run(_cfg(tmp_path))


@pytest.mark.parametrize("text,policy", [("5", CheckpointPolicy(epochs=5)),
                                         ("10m", CheckpointPolicy(seconds=600.0)),
                                         ("90s", CheckpointPolicy(seconds=90.0)),
                                         ("2h", CheckpointPolicy(seconds=7200.0))])
def test_checkpoint_every_parses_epochs_and_times(text, policy):
    assert CheckpointPolicy.parse(text) == policy


@pytest.mark.parametrize("text", ["0", "-1m", "m", "ten", "1.5"])
def test_checkpoint_every_refuses_what_it_cannot_read(text):
    with pytest.raises(ValueError, match="number of epochs"):
        CheckpointPolicy.parse(text)


def test_the_cli_rejects_a_bad_interval_with_exit_2(capsys):
    from benchmarks.exec.run import main

    code = main(["--method", "finetune", "--benchmark", "synthetic", "--protocol", "smoke",
                 "--checkpoint-every", "often", "--no-progress", "--tasks", "1"])
    assert code == 2 and "--checkpoint-every 'often'" in capsys.readouterr().err


def _blobs(run_dir: Path) -> dict:
    store = ArtifactStore(run_dir / "artifacts")
    return {(t, n): store.get_bytes(n, t) for t in store.tasks() for n in store.names(t)}


def test_resume_with_an_epoch_interval_is_bit_exact(tmp_path, monkeypatch):
    """Checkpoints every 2 of 5 epochs (after epochs 2 and 4, and 5: the last), killed in
    epoch 4: the resumed run restarts after epoch 2, trains epochs 3-5 (6 steps) and ends
    bit-identical to an uninterrupted run; its checkpoints went to --checkpoint-dir."""
    scratch = tmp_path / "scratch"

    def config(out: Path) -> RunConfig:
        return _cfg(out, deterministic=True, protocol_overrides={"epochs": 5},
                    checkpoint_every="2", checkpoint_dir=str(scratch))

    whole = run(config(tmp_path / "whole"))
    step, calls, kill_after = training.Trainer.step, [0], 7  # 2 steps per epoch

    def counted(self, x, y):
        calls[0] += 1
        if calls[0] > kill_after:
            raise KeyboardInterrupt
        return step(self, x, y)

    monkeypatch.setattr(training.Trainer, "step", counted)
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path / "resumed"))
    run_dir = next((tmp_path / "resumed").iterdir())
    saved = list((scratch / run_dir.name).glob("task000-*.pt"))
    assert len(saved) == 1 and not (run_dir / "checkpoints").exists()
    assert torch.load(saved[0], weights_only=False)["epochs_done"] == 2
    calls[0], kill_after = 0, 10**9
    run(config(tmp_path / "resumed"))
    assert calls[0] == 6
    assert not list((scratch / run_dir.name).glob("*"))  # removed once the task is stored
    assert _blobs(whole) == _blobs(run_dir)
    a, b = (load_rows(d) for d in (whole, run_dir))
    a, b = (x[~x.metric.isin(TIMING_METRICS)].sort_values(["after_task", "task", "metric"])
            .drop(columns="run_id").reset_index(drop=True) for x in (a, b))
    pd.testing.assert_frame_equal(a, b)


def test_a_time_interval_saves_when_due(monkeypatch, tmp_path):
    """With '1m', only epochs ending a minute or more after the last save are saved (and the
    last); the clock is the test's."""
    clock = iter(range(0, 10_000, 25))  # each reading 25 s later
    monkeypatch.setattr(training.time, "perf_counter", lambda: float(next(clock)))
    saved = []
    monkeypatch.setattr(training, "save_checkpoint",  # the name fit calls
                        lambda path, trainer, epochs, stats, running: saved.append(epochs))
    from benchmarks.data import BENCHMARKS

    bench = BENCHMARKS.get("synthetic")(None, num_tasks=1, n_train=8, size=8)
    proto = resolve_protocol("smoke", "synthetic").with_overrides(epochs=6)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    training.fit(model, _Plain(), proto, bench.tasks[0].train, training.PhaseSpec(
        device=torch.device("cpu"), seed=1, task=0, phase="train", progress=False,
        checkpoint=tmp_path / "c.pt", checkpoint_every=CheckpointPolicy.parse("1m")))
    # clock readings: 0 at the start, then one per epoch end and one after each save:
    # epochs end at 25, 50, 75 (saved: >= 60 s), 125, 150, 175 (the last: saved)
    assert saved == [3, 6]
