"""``--arch resnet18-maxpool``: torchvision's ResNet-18 with its max-pool, the network of the
NWS authors' Finetune trainer (JianJiangKCL/NeuralWeightSearch models/BaselineTrainer.py);
the default ``resnet18`` stays the paper's network without it."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from benchmarks.core.results import load_rows
from benchmarks.exec.run import main as cli
from benchmarks.models import archs
from benchmarks.models.archs import Pretrained

ARCH = "resnet18-maxpool"


def _after_stem(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.maxpool(model.relu(model.bn1(model.conv1(x))))


def test_builds_with_the_max_pool_and_halves_the_stems_output():
    model, plain = archs.build(ARCH, 5).eval(), archs.build("resnet18", 5).eval()
    assert isinstance(model.maxpool, nn.MaxPool2d) and isinstance(plain.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # 32x32: the 7x7/2 conv gives 16x16, the 3x3/2 max-pool 8x8 (resnet18: 16x16)
        assert _after_stem(model, x).shape == (2, 64, 8, 8)
        assert _after_stem(plain, x).shape == (2, 64, 16, 16)
        assert model(x).shape == (2, 5)
    assert model.state_dict().keys() == plain.state_dict().keys()  # same weights
    assert archs.ARCHS.get(ARCH).torchvision_weights == "resnet18:IMAGENET1K_V1"


def test_a_torchvision_resnet18_weights_file_loads_unchanged(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None)  # torchvision's layout, 1000 classes
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    loaded = Pretrained(ARCH, str(path)).model().eval()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), source.eval()(x))  # the very network torchvision builds


@pytest.mark.parametrize("method", ["finetune", "nws"])
def test_a_smoke_run_on_it(method, tmp_path):
    code = cli(["--arch", ARCH, "--method", method, "--benchmark", "split_digits",
                "--protocol", "smoke", "--tasks", "1", "--seeds", "7", "--no-progress",
                "--pretrained", "none", "--out", str(tmp_path)])
    assert code == 0
    rows = load_rows(tmp_path)
    acc = rows[rows.metric == "accuracy"]
    assert set(rows.arch) == {ARCH} and len(acc) == 1 and 0 <= acc.value.iloc[0] <= 1
