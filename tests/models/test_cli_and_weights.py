"""CLI, registries, protocols with provenance, and the offline weights rules."""

from __future__ import annotations

import pytest
import torch

from benchmarks.core.protocols import resolve_protocol
from benchmarks.exec.run import main
from benchmarks.models import archs
from benchmarks.models.archs import Pretrained, WeightsUnavailableError


def test_list_shows_every_registry(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for word in ("finetune", "nws", "split_digits", "cub_to_sketches", "resnet18", "paper",
                 "smoke", "lr = 0.01  (paper §5.4"):
        assert word in out


@pytest.mark.parametrize(("flag", "valid"), [
    ("--method", "finetune"), ("--benchmark", "split_cifar100"), ("--arch", "resnet18"),
    ("--protocol", "authors-code"),
])
def test_unknown_names_stop_with_the_valid_ones(capsys, flag, valid):
    args = ["--method", "finetune", flag, "nonsense"] if flag != "--method" else [flag, "nonsense"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown" in err and "'nonsense'" in err and valid in err


def test_missing_data_stops_with_a_message_not_a_traceback(capsys, tmp_path):
    code = main(["--method", "finetune", "--benchmark", "cub_to_sketches",
                 "--data-root", str(tmp_path), "--out", str(tmp_path / "runs")])
    assert code == 2
    assert "cubs_cropped/train" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing half-made


def test_protocols_resolve_per_benchmark_with_provenance():
    cifar = resolve_protocol("paper", "split_cifar100")
    cub = resolve_protocol("paper", "cub_to_sketches")
    assert (cifar.lr, cub.lr) == (0.01, 0.001)
    assert cifar.lr_milestones == (50, 80) and cifar.epochs == 100
    assert cub.amp == "fp16" and cifar.amp == "none"
    code = resolve_protocol("authors-code", "split_cifar100")
    assert code.nesterov and code.weight_decay == 4e-5
    assert code.provenance["weight_decay"] == "authors' code"
    changed = cifar.with_overrides(epochs=3)
    assert changed.epochs == 3 and changed.provenance["epochs"] == "override"
    with pytest.raises(ValueError, match="unknown protocol field"):
        cifar.with_overrides(epoch=3)


def test_imagenet_weights_unavailable_says_how_to_proceed(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        Pretrained("resnet18", "imagenet").model()
    msg = str(err.value)
    assert "--weights PATH" in msg and "--pretrained none" in msg


def test_weights_file_loads_into_the_no_maxpool_resnet(tmp_path):
    source = archs.build("resnet18")
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    model = Pretrained("resnet18", str(path)).model()
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    assert isinstance(model.maxpool, torch.nn.Identity)
    out = model.eval()(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 1000)
    # the stem halves 32x32 to 16x16 and layer1 keeps it (no max-pool)
    feats = model.layer1(model.relu(model.bn1(model.conv1(torch.randn(1, 3, 32, 32)))))
    assert feats.shape[-1] == 16


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not found"):
        Pretrained("resnet18", str(tmp_path / "nope.pth"))


def test_pretrained_none_is_a_fixed_random_init_per_seed():
    a = Pretrained("resnet18", "none", seed=1).model().conv1.weight
    b = Pretrained("resnet18", "none", seed=1).model().conv1.weight
    c = Pretrained("resnet18", "none", seed=2).model().conv1.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_input_too_small_for_the_arch_stops_before_training(capsys, tmp_path):
    code = main(["--method", "finetune", "--arch", "vgg16", "--benchmark", "split_digits",
                 "--bench-opt", "size=16", "--out", str(tmp_path / "runs"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "vgg16 needs inputs of at least 32x32 pixels; split_digits gives 16x16" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("arch", "size"), [("vgg16", 32), ("resnet18", 1)])
def test_smallest_input_size_per_arch(arch, size):
    assert archs.min_input_size(arch, 16) == size
    archs.check_input_size(arch, size)  # the named minimum really works
    if size > 1:
        with pytest.raises(archs.InputTooSmallError):
            archs.check_input_size(arch, size - 1)


def test_the_search_path_is_recorded_and_kept_on_resume(tmp_path, capsys):
    """--search picks the NWS search path (env.json, run identity); a resume under the other
    path is refused (they differ on float32 near ties), not silently mixed."""
    import json

    args = ["--method", "nws", "--benchmark", "split_digits", "--protocol", "smoke",
            "--tasks", "1", "--no-progress", "--out", str(tmp_path)]
    assert main([*args, "--search", "full"]) == 0
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "env.json").read_text())["device_policy"]["search"] == "full"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["identity"]["policy_search"] == "full"
    capsys.readouterr()
    assert main([*args, "--search", "certificates"]) == 2
    assert "--search full" in capsys.readouterr().err
    assert main([*args, "--search", "full"]) == 0  # the same path resumes (nothing to do)


@pytest.mark.slow
def test_a_compiled_cpu_run_records_the_full_search_in_its_identity(tmp_path, monkeypatch):
    """--compile without --search: the policy takes the full search on CPU (the certificates
    fragment a compiled step by design), and the run identity says so (policy_search)."""
    import json

    monkeypatch.delenv("NWS_SEARCH", raising=False)
    monkeypatch.setattr("benchmarks.engine.training.compile_options",
                        lambda device: {"backend": "eager"})  # dynamo only: no C++ builds
    args = ["--method", "nws", "--benchmark", "split_digits", "--protocol", "smoke",
            "--tasks", "1", "--no-progress", "--out", str(tmp_path), "--compile"]
    assert main(args) == 0
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "env.json").read_text())["device_policy"]["search"] == "full"
    assert json.loads((run_dir / "config.json").read_text())["identity"][
        "policy_search"] == "full"
