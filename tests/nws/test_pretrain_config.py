"""``python -m benchmarks.pretrain``: the authors' pretraining defaults and SyncBN under DDP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.models.pretrain import parse_args
from nws.pretrain import PretrainConfig, use_sync_bn, with_sync_bn

REQUIRED = ["--data", "d", "--out", "o"]


def test_defaults_are_the_authors_pretraining() -> None:
    cfg, run = parse_args(REQUIRED)
    assert (cfg.beta, cfg.weight_decay, cfg.nesterov, cfg.sync_bn) == (0.5, 4e-5, True, True)
    assert (cfg.lr, cfg.momentum, cfg.epochs, cfg.milestones) == (0.01, 0.9, 160, (100,))
    assert cfg == PretrainConfig()  # the CLI and the library agree
    assert run == {"data": "d", "out": "o", "arch": "resnet18", "image_size": 224}


def test_boolean_flags_turn_off_and_help_names_sources(capsys) -> None:
    cfg, _ = parse_args([*REQUIRED, "--no-nesterov", "--no-sync-bn", "--beta", "1.0"])
    assert (cfg.nesterov, cfg.sync_bn, cfg.beta) == (False, False, 1.0)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-nesterov" in text and "--no-sync-bn" in text
    assert "[authors' code; paper §5.4 (Eq. 3)]" in text  # beta's provenance


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))


@pytest.mark.parametrize(("world", "device", "sync_bn", "expected"), [
    (2, "cuda", True, True), (8, "cuda", True, True), (1, "cuda", True, False),
    (2, "cuda", False, False), (2, "cpu", True, False)])
def test_sync_bn_decision(world: int, device: str, sync_bn: bool, expected: bool) -> None:
    cfg = PretrainConfig(sync_bn=sync_bn)
    assert use_sync_bn(cfg, world, torch.device(device)) is expected
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = with_sync_bn(model, cfg, world, torch.device(device))  # converting needs no GPU
    kinds = [type(m) for m in out.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [nn.SyncBatchNorm if expected else nn.BatchNorm2d] * 2
    assert out.state_dict().keys() == before.keys()  # checkpoints and pools files unchanged
    for k, v in out.state_dict().items():
        assert torch.equal(v, before[k])
