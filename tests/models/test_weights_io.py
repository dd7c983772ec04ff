"""--weights files in the forms people save them; anything else refused, nothing executed."""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from benchmarks.exec.run import main
from benchmarks.models import archs
from benchmarks.models.archs import Pretrained
from benchmarks.models.weights_io import WeightsFileError, load_state_dict, strip_wrappers


@pytest.fixture(scope="module")
def tiny() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4, 2))
    model[1].running_mean.normal_()
    return model.state_dict()


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def _training_checkpoint(sd):
    """What a typical training script saves: weights beside args, optimizer, metrics."""
    p = [nn.Parameter(torch.ones(2))]
    opt = torch.optim.SGD(p, lr=0.1, momentum=0.9)
    p[0].grad = torch.ones(2)
    opt.step()
    return {"epoch": 90, "arch": "tiny", "state_dict": sd, "optimizer": opt.state_dict(),
            "args": argparse.Namespace(lr=0.1, data=pathlib.PurePosixPath("/data"),
                                       milestones=[50, 80]),
            "best_acc1": np.float64(77.3), "confusion": np.zeros((2, 2), dtype=np.int64),
            "notes": "run 3"}


FORMS = {
    "plain": lambda sd: sd,
    "training checkpoint with Namespace": _training_checkpoint,
    "DDP under 'model'": lambda sd: {"model": _prefixed(sd, "module.")},
    "torch.compile prefix": lambda sd: {"state_dict": _prefixed(sd, "_orig_mod.")},
    "DDP + compile + wrapper": lambda sd: _prefixed(sd, "module._orig_mod.model."),
    "'net'": lambda sd: {"net": sd, "acc": 0.5},
    "EMA only": lambda sd: {"model_ema": _prefixed(sd, "module."), "epoch": 3},
    "EMA beside plain (plain wins)": lambda sd: {
        "ema": {k: torch.zeros_like(v) for k, v in sd.items()}, "model": sd},
    "nested twice": lambda sd: {"checkpoint": 1, "model": {"state_dict": sd, "step": 7}},
}


@pytest.mark.parametrize("form", list(FORMS))
def test_each_saved_form_gives_the_same_tensors(tmp_path, tiny, form):
    path = tmp_path / "w.pth"
    torch.save(FORMS[form](tiny), path)
    got = load_state_dict(path)
    assert list(got) == list(tiny)
    for k, v in tiny.items():
        assert torch.equal(got[k], v) and got[k].device.type == "cpu"


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])  # detected by content
def test_safetensors_files_load_through_the_safetensors_library(tmp_path, tiny, suffix):
    path = tmp_path / f"w{suffix}"
    save_file(_prefixed(tiny, "module."), str(path))
    got = load_state_dict(path)
    assert all(torch.equal(got[k], v) for k, v in tiny.items()) and len(got) == len(tiny)


class _Payload:
    """A pickle that would create a file when unpickled, if it were ever executed."""

    target = ""

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def test_a_pickled_arbitrary_object_is_refused_and_nothing_runs(tmp_path, tiny):
    marker = tmp_path / "executed"
    payload = _Payload()
    payload.target = str(marker)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny, "hook": payload}, path)
    with pytest.raises(WeightsFileError) as err:
        load_state_dict(path)
    assert not marker.exists()
    msg = str(err.value)
    assert str(path) in msg and "weights_only=False" in msg and "torch.save(" in msg
    assert "torch refused getattr" in msg  # the refused object is named


def test_a_file_that_is_not_weights_is_refused_by_name(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(WeightsFileError, match="not a torch or safetensors weights file"):
        load_state_dict(path)
    path = tmp_path / "no_tensors.pt"
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(WeightsFileError, match="holds no tensors by name"):
        load_state_dict(path)


def test_wrapper_prefixes_are_stripped_only_when_every_key_has_one():
    t = torch.zeros(1)
    assert list(strip_wrappers({"module.a": t, "module.b": t})) == ["a", "b"]
    assert list(strip_wrappers({"model.a": t, "fc.b": t})) == ["model.a", "fc.b"]
    assert list(strip_wrappers({"layer1._orig_mod.0.w": t})) == ["layer1.0.w"]


def test_a_training_checkpoint_starts_a_resnet(tmp_path):
    source = archs.build("resnet18")
    path = tmp_path / "ckpt.pth.tar"
    torch.save(_training_checkpoint(_prefixed(source.state_dict(), "module.")), path)
    model = Pretrained("resnet18", str(path)).model()
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_cli_stops_with_exit_2_before_any_run_folder(tmp_path, tiny, capsys):
    path = tmp_path / "evil.pt"
    payload = _Payload()
    payload.target = str(tmp_path / "executed")
    torch.save({"model": tiny, "x": payload}, path)
    code = main(["--method", "finetune", "--weights", str(path), "--tasks", "1",
                 "--out", str(tmp_path / "runs"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "executed").exists()


def test_a_checkpoint_numpy_1_wrote_loads_under_numpy_2(tmp_path, tiny):
    """numpy 1 pickles its scalars as numpy.core.multiarray.scalar (numpy 2: numpy._core)."""
    path = tmp_path / "old.pt"
    torch.save({"state_dict": tiny, "best_acc1": np.float64(71.5), "hist": np.arange(3)}, path,
               _use_new_zipfile_serialization=False)  # one plain pickle stream: names editable
    if np.__version__.startswith("1."):
        pytest.skip("numpy 1 writes the old names itself")
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    got = load_state_dict(path)
    assert all(torch.equal(got[k], v) for k, v in tiny.items())


def test_a_truncated_safetensors_file_is_refused_by_name(tmp_path, tiny):
    path = tmp_path / "w.safetensors"
    save_file(tiny, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 8])
    with pytest.raises(WeightsFileError, match="not a readable safetensors file") as err:
        load_state_dict(path)
    assert str(path) in str(err.value)
