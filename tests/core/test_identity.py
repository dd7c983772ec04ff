"""Run identity across inputs and versions (docs/reproducibility.md, Run identity).

- Run ids of default runs are pinned to the literal ids the code computed at commit 04f6cf6
  (before this rule): a change that moves them moves users' run folders.
- An option added with a default changes no run id, and an old config.json without it
  resumes; a bumped rule version refuses the old folder, naming it.
- An input file replaced at the same path is refused on resume, naming it; a relative path
  is the same run inline and through a launcher.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import benchmarks.core.identity as identity
import benchmarks.engine.harness as harness
from baselines.finetune import Finetune
from benchmarks.core.identity import id_options, run_id
from benchmarks.core.protocols import S
from benchmarks.engine.harness import RunConfig, RunConflictError, run
from benchmarks.exec import run as cli
from benchmarks.methods.nws_method import NWSMethod
from benchmarks.methods.table import METHODS
from benchmarks.models import archs

# Computed by benchmarks.engine.harness.run_id at commit 04f6cf6 (the main branch before this rule),
# for RunConfig(method=m) defaults: split_digits, resnet18, quick, seed 1993, pretrained none.
DEFAULT_IDS = {
    "finetune": "split_digits-finetune-resnet18-quick-s1993-a8a397b4",
    "nws": "split_digits-nws-resnet18-quick-s1993-e8d27d0e",
    "ksm": "split_digits-ksm-resnet18-quick-s1993-8399198a",
    "packnet": "split_digits-packnet-resnet18-quick-s1993-04b293f9",
    "aqd": "split_digits-aqd-resnet18-quick-s1993-a02830af",
}
# The same at 04f6cf6 for split_cifar100 (pretrained imagenet; NWS and PackNet have
# per-benchmark defaults there).
CIFAR_IDS = {
    "finetune": "split_cifar100-finetune-resnet18-quick-s1993-9e6e2b6b",
    "nws": "split_cifar100-nws-resnet18-quick-s1993-f7d90523",
    "ksm": "split_cifar100-ksm-resnet18-quick-s1993-2a6d5411",
    "packnet": "split_cifar100-packnet-resnet18-quick-s1993-d6d11cec",
    "aqd": "split_cifar100-aqd-resnet18-quick-s1993-adb3e513",
}
SMOKE = dict(method="finetune", benchmark="synthetic", protocol="smoke", progress=False,
             num_tasks=1)


@pytest.fixture
def rid_only(monkeypatch):
    """``run`` stops right after computing the run id, returning it (no folder, no lock)."""
    class NoLock:
        def __init__(self, *args) -> None: ...
        def __enter__(self): return self
        def __exit__(self, *args) -> bool: return False

    monkeypatch.setattr(harness, "RunLock", NoLock)
    monkeypatch.setattr(harness, "_run_locked", lambda r, *rest: r.rid)


@pytest.mark.parametrize("method", sorted(DEFAULT_IDS))
def test_default_run_ids_are_those_of_the_commit_before(method, rid_only, tmp_path):
    assert run(RunConfig(method=method, out=str(tmp_path))) == DEFAULT_IDS[method]


@pytest.mark.parametrize("method", sorted(CIFAR_IDS))
def test_paper_benchmark_run_ids_are_those_of_the_commit_before(method):
    cls = METHODS.get(method)
    defaults = {k: s.value for k, s in cls.settings("split_cifar100").items()}
    cfg = RunConfig(method=method, benchmark="split_cifar100")
    ident = {"options": cls.resolve_options("split_cifar100", {}), "pretrained": "imagenet",
             "num_tasks": None, "benchmark_options": {}}
    assert run_id(cfg, ident, defaults) == CIFAR_IDS[method]


def test_an_option_added_with_a_default_changes_no_run_id(monkeypatch, rid_only, tmp_path):
    cfg = RunConfig(method="nws", out=str(tmp_path))
    before = run(cfg)
    added = {"default": NWSMethod.SETTINGS["default"] | {"soft_norm": S(False, "test")}}
    monkeypatch.setattr(NWSMethod, "SETTINGS", NWSMethod.SETTINGS | added)
    assert run(cfg) == before == DEFAULT_IDS["nws"]
    assert run(RunConfig(method="nws", out=str(tmp_path),
                         method_options={"soft_norm": True})) != before
    # an option of the base set to another value: as before this rule (options hashed whole)
    delta = run(RunConfig(method="nws", out=str(tmp_path), method_options={"codec": "delta"}))
    assert delta == "split_digits-nws-resnet18-quick-s1993-624d6f02"  # at 04f6cf6


def test_id_options_keep_the_base_when_a_default_changes():
    """A base option whose default changed keeps hashing its base value for default runs: the
    same folder, where the changed options (and the rule version) refuse the resume."""
    defaults = {"prune": 0.5, "retrain_lr_factor": 0.1}
    got = id_options("packnet", "split_digits", defaults, defaults)
    assert got["prune"] == "equal-share"  # the base value, not today's default
    assert id_options("packnet", "split_digits", {**defaults, "prune": 0.7},
                      defaults)["prune"] == 0.7


def _strip_new_keys(run_dir: Path) -> None:
    """config.json as the commit before wrote it: no rule version, inputs, newer fields."""
    path = run_dir / "config.json"
    config = json.loads(path.read_text())
    for key in ("rule_version", "inputs"):
        config["identity"].pop(key)
    config["identity"]["protocol"].pop("drop_last")  # a field with a default
    path.write_text(json.dumps(config))


def test_an_old_config_without_new_keys_resumes(tmp_path, monkeypatch):
    run_dir = run(RunConfig(out=str(tmp_path), **SMOKE))
    _strip_new_keys(run_dir)
    monkeypatch.setattr(Finetune, "SETTINGS", {"default": {"new_opt": S(0, "test")}})
    # read as today's code would have written it: the same run, found done (a finished run is
    # reported without a write, so its old config.json stays as it was)
    assert run(RunConfig(out=str(tmp_path), **SMOKE)) == run_dir
    assert "rule_version" not in json.loads((run_dir / "config.json").read_text())["identity"]


def test_a_bumped_rule_version_refuses_the_old_folder_naming_it(tmp_path, monkeypatch):
    run_dir = run(RunConfig(out=str(tmp_path), **SMOKE))
    _strip_new_keys(run_dir)  # an old folder: rule version 1 by default
    monkeypatch.setattr(Finetune, "rule_version", 2)
    with pytest.raises(RunConflictError, match="rule version 1 of method finetune") as err:
        run(RunConfig(out=str(tmp_path), **SMOKE))
    assert str(run_dir) in str(err.value) and "version 2" in str(err.value)


def _weights(path: Path, scale: float = 1.0) -> Path:
    torch.manual_seed(0)
    state = archs.build("resnet18", 2).state_dict()
    torch.save({k: v * scale if v.is_floating_point() else v for k, v in state.items()}, path)
    return path


def test_a_replaced_weights_file_is_refused_naming_it(tmp_path):
    weights = _weights(tmp_path / "w.pt")
    cfg = RunConfig(out=str(tmp_path / "runs"), pretrained=str(weights), **SMOKE)
    run_dir = run(cfg)
    recorded = json.loads((run_dir / "config.json").read_text())["identity"]["inputs"]
    assert recorded["--weights"]["path"] == str(weights.resolve())
    _weights(weights, scale=0.5)  # another file at the same path
    with pytest.raises(RunConflictError, match="--weights") as err:
        run(cfg)
    assert str(weights.resolve()) in str(err.value) and "has changed" in str(err.value)
    assert cli.main(["--method", "finetune", "--benchmark", "synthetic", "--protocol",
                     "smoke", "--tasks", "1", "--no-progress", "--seeds", "1993", "--out",
                     str(tmp_path / "runs"), "--weights", str(weights)]) == 2


def test_a_relative_path_is_one_run_inline_and_through_a_launcher(tmp_path, monkeypatch):
    _weights(tmp_path / "w.pt")
    pools = tmp_path / "pools.pt"
    pools.write_bytes(b"")  # only its path matters here (its contents: NWS's check, mocked)
    monkeypatch.setattr(NWSMethod, "check_options", classmethod(lambda cls, o: None))
    monkeypatch.chdir(tmp_path)
    argv = ["--method", "nws", "--weights", "w.pt", "--opt", "pools=pools.pt", "--out", "runs"]
    inline = cli.run_configs(cli.parser().parse_args(argv))[0]
    from benchmarks.exec.launch import plan_jobs

    p = cli.parser()
    job = plan_jobs(p.parse_args([*argv, "--launcher", "local"]))[0]
    assert inline.pretrained == str(tmp_path / "w.pt") == job.match["pretrained"]
    assert inline.method_options["pools"] == str(pools) == job.match["method_options"]["pools"]
    assert job.run_config().method_options == inline.method_options
    jobbed = cli.run_configs(cli.parser().parse_args(job.argv()))[0]
    assert (jobbed.pretrained, jobbed.method_options) == (inline.pretrained,
                                                          inline.method_options)


def test_an_input_file_is_digested_once_per_version(tmp_path, monkeypatch):
    calls = []
    real = identity.checksum_file
    monkeypatch.setattr(identity, "checksum_file", lambda p: calls.append(p) or real(p))
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10)
    first = identity.file_digest(path)
    assert identity.file_digest(path) == first and len(calls) == 1
    path.write_bytes(b"y" * 11)
    assert identity.file_digest(path) != first and len(calls) == 2
    os.utime(path, ns=(1, 1))  # another modification time: digested again
    identity.file_digest(path)
    assert len(calls) == 3


def test_run_folders_and_job_keys_of_specs_hold_no_colon(tmp_path):
    """A spec's colon (``timm:NAME``, ``pkg.mod:NAME``) never reaches a folder or file name:
    rsync and scp read ``a:b`` as a remote path and Windows forbids it."""
    from benchmarks.exec.launch import plan_jobs

    assert identity.folder_safe("split_digits-nws-timm:resnet10t-quick-s1") == (
        "split_digits-nws-timm_resnet10t-quick-s1")
    assert identity.folder_safe("split_digits-nws-resnet18-quick-s1993") == (
        "split_digits-nws-resnet18-quick-s1993")  # the registries' names unchanged
    args = cli.parser().parse_args(["--method", "finetune", "--benchmark", "synthetic",
                                    "--arch", "timm:resnet10t", "--protocol", "smoke",
                                    "--out", str(tmp_path), "--launcher", "local"])
    (job,) = plan_jobs(args)
    assert ":" not in job.key and "timm_resnet10t" in job.key
    assert job.config["arch"] == "timm:resnet10t"  # the spec itself travels unchanged
