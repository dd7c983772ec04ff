"""``--arch timm:NAME``: two small timm models (ResNet-10-T; MobileNetV3-Small 0.5x with
depthwise 3x3/5x5 convs, squeeze-excite convs with biases), offline, random init.

Build, head found by timm's ``get_classifier()`` and swapped, what NWS converts, store and
rebuild, CLI runs producing rows, ImageNet weights from timm's cache / refused offline, a
weights file, and the refusals (unknown names, methods that would lose tensors, convs NWS
would change).
"""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import nws
from benchmarks.core.results import load_rows
from benchmarks.core.store import ArtifactStore
from benchmarks.exec.run import main as cli
from benchmarks.methods.table import METHODS
from benchmarks.models import archs
from benchmarks.models.archs import ARCHS, InputTooSmallError, Pretrained
from benchmarks.models.weights_io import WeightsUnavailableError
from tests.models.test_archs_table3 import SMOKE_NWS, learn_store_rebuild

RESNET, MOBILE = "timm:resnet10t", "timm:mobilenetv3_small_050"
# where timm's own model puts its classifier (timm's pretrained_cfg "classifier")
HEADS = {RESNET: ("fc", 512), MOBILE: ("classifier", 1024)}
SMOKE = ["--benchmark", "synthetic", "--protocol", "smoke", "--tasks", "1", "--seeds", "7",
         "--pretrained", "none", "--no-progress"]


@pytest.mark.parametrize("arch", list(HEADS))
def test_build_finds_the_head_through_timm_and_swaps_it(arch):
    path, width = HEADS[arch]
    assert ARCHS.get(arch).head == path
    model = archs.build(arch)
    assert model.get_classifier() is archs.get_head(model, arch)
    assert (archs.get_head(model, arch).in_features, archs.get_head(model, arch).out_features
            ) == (width, 1000)
    head = archs.new_head(model, arch, 7)
    archs.set_head(model, arch, head)
    assert model.get_classifier() is head  # timm's own accessor sees the swap
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    archs.check_input_size(arch, 32)  # probes the model on the meta device


def test_a_timm_model_built_for_one_input_size_is_refused_naming_it():
    with pytest.raises(InputTooSmallError, match=r"timm:vit_tiny_patch16_224 does not take "
                                                 r"32x32 inputs: Input height \(32\)"):
        archs.check_input_size("timm:vit_tiny_patch16_224", 32)


def test_nws_searches_every_conv_of_a_timm_model_depthwise_and_5x5_included():
    """Each Conv2d of timm's MobileNetV3 (read off the model, not off nwsify) becomes one
    NWS layer with its groups, one pool entry per k x k kernel: out * in / groups kernels;
    the head is a 1x1 layer of C x 1024 scalar kernels."""
    model = archs.build(MOBILE, 5)
    convs = {n: (m.out_channels * m.in_channels // m.groups, m.kernel_size, m.groups)
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert {k for _, k, _ in convs.values()} == {(1, 1), (3, 3), (5, 5)}
    assert any(g > 1 for _, _, g in convs.values())  # depthwise
    layers = nws.nws_layers(nws.nwsify(model, pool_size=16))
    assert set(layers) == set(convs) | {"classifier"}
    for name, (kernels, (kh, kw), groups) in convs.items():
        assert layers[name].num_groups == kernels
        assert layers[name].pool.shape == (16, kh * kw) and layers[name].groups == groups
    assert layers["classifier"].num_groups == 5 * 1024
    assert layers["classifier"].pool.shape == (16, 1)


@pytest.mark.parametrize(("method", "arch"), [
    ("finetune", RESNET), ("finetune", MOBILE), ("nws", RESNET), ("nws", MOBILE),
    ("ksm", RESNET), ("packnet", RESNET), ("aqd", RESNET)])
def test_smoke_task_through_store_and_rebuild_gives_identical_logits(method, arch, tmp_path):
    trained, rebuilt = learn_store_rebuild(method, arch, tmp_path,
                                           SMOKE_NWS if method == "nws" else None)
    assert torch.isfinite(trained).all()
    assert torch.equal(trained, rebuilt)
    if method in ("finetune", "nws"):
        formula = METHODS.get(method).memory_formula(
            arch, [2], METHODS.get(method).resolve_options("synthetic", SMOKE_NWS)
            if method == "nws" else {})
        assert ArtifactStore(tmp_path / "artifacts").total_bytes() == formula.total()


def test_cli_runs_finetune_and_nws_on_a_timm_model_producing_rows(tmp_path):
    code = cli(["--arch", RESNET, "--method", "finetune,nws", *SMOKE, "--out", str(tmp_path),
                *[f"--opt={k}={v}" for k, v in SMOKE_NWS.items() if k != "pools"]])
    assert code == 0
    rows = load_rows(tmp_path)
    acc = rows[rows.metric == "accuracy"]
    assert set(acc.method) == {"finetune", "nws"} and set(acc.arch) == {RESNET}


@pytest.mark.parametrize("method", ["ksm", "packnet", "aqd"])
def test_methods_that_would_lose_tensors_refuse_the_arch(method, tmp_path, capsys):
    """MobileNetV3's squeeze-excite convs have biases: KSM, PackNet and AQD store conv
    weights only, so the rebuilt model would differ; refused before any run folder."""
    assert cli(["--arch", MOBILE, "--method", method, *SMOKE, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"method {method} cannot run on --arch {MOBILE}" in err
    assert "blocks.0.0.se.conv_reduce.bias (Conv2d with bias)" in err
    assert "Traceback" not in err and not any(tmp_path.iterdir())


def test_nws_refuses_a_timm_model_with_layer_norm(tmp_path, capsys):
    assert cli(["--arch", "timm:convnext_atto", "--method", "nws", *SMOKE,
                "--out", str(tmp_path)]) == 2
    assert "(LayerNorm2d)" in capsys.readouterr().err


def test_nws_group_size_that_does_not_divide_a_layer_is_refused_before_work(tmp_path, capsys):
    """MobileNetV3-Small 0.5x's depthwise convs have one kernel per channel: 40, 56 and 72
    channels are not multiples of 16 (blocks.1.0.conv_dw: 40 x 1 kernels)."""
    assert cli(["--arch", MOBILE, "--method", "nws", "--opt", "group_size=16", *SMOKE,
                "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "option group_size=16 does not divide" in err
    assert "blocks.1.0.conv_dw (40)" in err
    assert not any(tmp_path.iterdir())


def test_nwsify_refuses_a_conv_that_computes_something_else():
    """timm's Conv2dSame pads per input ('same' as TensorFlow); a plain NWS conv would not."""
    model = nn.Sequential(timm.layers.Conv2dSame(3, 8, 3, stride=2), nn.Flatten(),
                          nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"0 \(Conv2dSame\)"):
        nws.nwsify(model, pool_size=4)


@pytest.mark.parametrize(("arch", "words"), [
    ("timm:resnet10x", ["unknown timm model 'resnet10x'", "resnet10t", "timm.list_models"]),
    ("timm:resnet10t.bogus", ["no pretrained tag 'bogus'", "c3_in1k"]),
    ("timm:resnet10t.", ["an empty pretrained tag", "timm:resnet10t or"]),
])
def test_unknown_timm_names_exit_2_naming_them(arch, words, tmp_path, capsys):
    assert cli(["--arch", arch, "--method", "finetune", *SMOKE, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words) and "Traceback" not in err


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty Hugging Face cache and a hub endpoint that refuses connections."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for var in ("http_proxy", "https_proxy", "all_proxy"):  # a proxy skips the probe
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    return tmp_path / "hf"


def test_imagenet_weights_offline_are_refused_saying_how_to_proceed(offline, tmp_path, capsys):
    with pytest.raises(WeightsUnavailableError) as err:
        Pretrained(RESNET, "imagenet").model()
    msg = str(err.value)
    assert "timm/resnet10t.c3_in1k" in msg and "127.0.0.1:9 unreachable" in msg
    assert "--weights PATH" in msg and "--pretrained none" in msg and str(offline) in msg
    args = [a for a in SMOKE if a not in ("--pretrained", "none")]
    assert cli(["--arch", RESNET, "--method", "finetune", *args, "--pretrained", "imagenet",
                "--out", str(tmp_path / "runs")]) == 2
    assert "could not load timm's ImageNet weights" in capsys.readouterr().err


def test_imagenet_weights_in_the_hugging_face_cache_load_offline(offline):
    """A cache copied from a machine with internet: timm loads the file, no network."""
    source = archs.build(RESNET)
    snapshot = offline / "models--timm--resnet10t.c3_in1k" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(snapshot / "model.safetensors"))
    model = Pretrained(RESNET, "imagenet").model()
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_weights_file_loads_into_a_timm_model(tmp_path):
    source = archs.build(MOBILE)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    model = Pretrained(MOBILE, str(path)).model()
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_rebuild_without_init_keeps_constant_buffers():
    """resnetblur18's blur filters are non-persistent buffers no load restores: a
    no-init build constructs such a model for real (no NaN left in them)."""
    with archs.no_init():
        model = archs.build("timm:resnetblur18", 2)
    filters = [b for n, b in model.named_buffers() if n.endswith(".filt")]
    assert filters and all(torch.isfinite(f).all() and f.sum() > 0 for f in filters)


def test_list_shows_the_timm_prefix(capsys):
    assert cli(["--list"]) == 0
    assert "timm:NAME" in capsys.readouterr().out
