"""The authors' ``KP_resume.pt`` (docs/reference.md §1) for a real ResNet-18: pools, temporary
kernels and every BatchNorm tensor imported in module order under the authors' own layer
names; a CIFAR-100 head accepted; a file whose layers do not fit refused by key."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import nws
from benchmarks.core.protocols import resolve_protocol
from benchmarks.methods.contract import MethodContext, TaskInfo
from benchmarks.methods.nws_method import NWSMethod
from benchmarks.models import archs
from benchmarks.models.archs import Pretrained

QTZ = ("embed", "cluster_size", "embed_avg", "acum_embed_sum", "acum_embed_onehot_sum")
RULES = [  # our torchvision names -> the authors' ResNet's (stem/block convs as Sequentials)
    (r"^conv1$", "conv1.0"), (r"^bn1$", "conv1.1"), (r"\.conv(\d)$", r".conv\1.0"),
    (r"\.bn(\d)$", r".conv\1.1"), (r"\.downsample\.", ".shortcut."), (r"^fc$", "last_layer")]


def authors_name(name: str) -> str:
    for pattern, repl in RULES:
        name = re.sub(pattern, repl, name)
    return name


def authors_checkpoint(model: nn.Module, classes: int, seed: int = 0) -> dict:
    """What the authors' pretraining saves for ``model`` (module order, DDP prefix): per NWS
    layer its kernels (the head a (classes, in, 1, 1) conv) and its quantiser's 5 buffers,
    per BN layer its 5 tensors; random values."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        key = "module." + authors_name(name)
        if isinstance(m, nn.Conv2d | nn.Linear):
            shape = (classes, m.in_features, 1, 1) if isinstance(m, nn.Linear) else m.weight.shape
            dim = 1 if isinstance(m, nn.Linear) else m.weight[0, 0].numel()
            sd[f"{key}.weight"] = torch.randn(shape, generator=g)
            for buf in QTZ:
                size = (512,) if buf in ("cluster_size", "acum_embed_onehot_sum") else (dim, 512)
                sd[f"{key}.qtz.{buf}"] = torch.rand(size, generator=g)
        elif isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            sd |= {f"{key}.weight": torch.rand(c, generator=g),
                   f"{key}.bias": torch.randn(c, generator=g),
                   f"{key}.running_mean": torch.randn(c, generator=g),
                   f"{key}.running_var": torch.rand(c, generator=g) + 0.1,
                   f"{key}.num_batches_tracked": torch.tensor(1000 + len(sd))}
    return {"model": sd, "epoch": 160, "best_acc": 71.2}


@pytest.fixture(scope="module")
def cifar100_file(tmp_path_factory):
    """A KP_resume.pt pretrained on CIFAR-100 (the authors' script's default: 100 classes)."""
    ckpt = authors_checkpoint(archs.build("resnet18", 10), classes=100)
    path = tmp_path_factory.mktemp("kp") / "KP_resume.pt"
    torch.save(ckpt, path)
    return path, ckpt["model"]


def _bn_of(model: nn.Module) -> dict[str, _BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


def test_every_bn_tensor_pools_and_kernels_imported(cifar100_file) -> None:
    path, sd = cifar100_file
    model = archs.build("resnet18", 1000)  # the pretrained model, ImageNet head
    pf = nws.import_authors_pools(path, model)
    bn = _bn_of(model)
    assert len(bn) == 20
    bn_keys = [f"{n}.{k}" for n, m in bn.items() for k in m.state_dict()]
    # docs/reference.md §2: 20 BN layers
    assert len(bn_keys) == 100 and set(bn_keys) <= set(pf.state)
    for key in bn_keys:
        layer, _, tensor = key.rpartition(".")
        want = sd[f"module.{authors_name(layer)}.{tensor}"]
        assert torch.equal(pf.state[key], want) and pf.state[key].dtype == want.dtype, key
    for name in nws.convertible_layers(model):
        src = f"module.{authors_name(name)}"
        assert torch.equal(pf.pools[name], sd[f"{src}.qtz.embed"].t())
        assert torch.equal(pf.weights[name].flatten(), sd[f"{src}.weight"].flatten())
    assert pf.weights["fc"].shape == (100, 512)  # the file's head: 51,200 values, kept whole


def test_task0_starts_from_the_files_bn_kernels_and_head_rows(cifar100_file) -> None:
    """Through the suite: ``--opt pools=authors:KP_resume.pt`` on a 5-class first task."""
    path, sd = cifar100_file
    tasks = (TaskInfo(0, "t0", 5),)
    options = NWSMethod.resolve_options("split_cifar100", {"pools": f"authors:{path}"})
    ctx = MethodContext("resnet18", "split_cifar100", tasks,
                        resolve_protocol("smoke", "split_cifar100"), torch.device("cpu"), 1993,
                        Pretrained("resnet18", "none"), options)
    model = NWSMethod(ctx).model_for_task(tasks[0], None)
    state = model.state_dict()
    for name, m in _bn_of(model).items():
        for k in m.state_dict():
            assert torch.equal(state[f"{name}.{k}"],
                               sd[f"module.{authors_name(name)}.{k}"]), f"{name}.{k}"
    head = nws.nws_layers(model)["fc"]
    # docs/reference.md §1: the first C rows of the file's head
    assert head.weight.shape == (5, 512)
    torch.testing.assert_close(head.weight.detach(),
                               sd["module.last_layer.weight"][:5].reshape(5, 512))
    torch.testing.assert_close(nws.nws_layers(model)["layer1.0.conv1"].weight.detach(),
                               sd["module.layer1.0.conv1.0.weight"])


def _edit(sd: dict, drop: str | None = None, **replace: torch.Tensor) -> dict:
    out = {k: v for k, v in sd.items() if drop is None or not k.startswith(drop)}
    return {"model": out | {f"module.{k}": v for k, v in replace.items()}}


@pytest.mark.parametrize(("change", "message"), [
    (dict(drop="module.layer4.1.conv2.1."),  # the last BN layer missing
     r"KP_bad\.pt has 19 BatchNorm layers .*the model 20; paired in module order, the "
     r"model's 'layer4\.1\.bn2' has no counterpart"),
    # a BN layer missing inside layer3 (all 256 wide): named where the widths part
    (dict(drop="module.layer3.0.conv1.1."),
     r"KP_bad\.pt has 19 BatchNorm layers .*they first differ at the model's "
     r"'layer3\.1\.bn2' \(256,\) vs the file's 'layer4\.0\.conv1\.1\.running_mean' \(512,\)"),
    ({"drop": None, "extra.1.running_mean": torch.zeros(3)},  # a BN layer more
     r"KP_bad\.pt has 21 BatchNorm layers .*the file's 'extra\.1\.running_mean' has no "
     r"counterpart"),
    ({"drop": None, "layer2.0.conv1.1.running_var": torch.ones(64)},  # wrong width
     r"KP_bad\.pt: 'layer2\.0\.conv1\.1\.running_var' has shape \(64,\), the model's "
     r"'layer2\.0\.bn1\.running_var' needs \(128,\)"),
    (dict(drop="module.conv1.1.bias"),  # a BN tensor missing
     r"KP_bad\.pt lacks 'conv1\.1\.bias' \(the model's 'bn1\.bias'\)"),
    ({"drop": None, "last_layer.weight": torch.zeros(100, 256, 1, 1)},  # head of another width
     r"KP_bad\.pt: 'last_layer\.weight' has shape \(100, 256, 1, 1\), the model's classifier"),
    (dict(drop="module.layer3.0.shortcut.0."),  # an NWS layer fewer: where orders part
     r"KP_bad\.pt has 20 NWS layers .*the model 21; paired in module order, they first "
     r"differ at the model's 'layer3\.0\.downsample\.0' \(1, 128\) vs the file's "
     r"'layer3\.1\.conv1\.0\.qtz\.embed' \(9, 2304\)"),
])
def test_files_that_do_not_fit_are_refused_by_key(cifar100_file, tmp_path, change,
                                                   message) -> None:
    _, sd = cifar100_file
    torch.save(_edit(sd, **change), tmp_path / "KP_bad.pt")
    with pytest.raises(ValueError, match=message):
        nws.import_authors_pools(tmp_path / "KP_bad.pt", archs.build("resnet18", 1000))


def test_checkpoint_without_bn_counter_keeps_the_models(cifar100_file, tmp_path) -> None:
    """torch < 0.4.1 saved no num_batches_tracked: the model's counter stays."""
    _, sd = cifar100_file
    old = {"model": {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}}
    torch.save(old, tmp_path / "old.pt")
    pf = nws.import_authors_pools(tmp_path / "old.pt", archs.build("resnet18", 1000))
    assert "bn1.running_var" in pf.state and "bn1.num_batches_tracked" not in pf.state


def test_unsafe_or_missing_file_is_refused_by_name(tmp_path) -> None:
    import argparse

    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "ns.pt")
    with pytest.raises(ValueError, match=r"ns\.pt: not a torch checkpoint of tensors"):
        nws.import_authors_pools(tmp_path / "ns.pt", nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(ValueError, match=r"missing\.pt does not exist"):
        nws.import_authors_pools(tmp_path / "missing.pt", nn.Sequential(nn.Conv2d(1, 1, 1)))
