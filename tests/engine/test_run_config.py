"""The run configuration is the one home of a run option: every field has a flag and a
source, the CLI parses into it, a job carries it as JSON, and its one-run command line
parses back into the same configuration."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from benchmarks.engine.run_config import RunConfig, parse_value, run_flags
from benchmarks.exec import run as cli
from benchmarks.exec.sweep import Job

PLAN = ["--method", "finetune,ksm", "--benchmark", "synthetic", "--protocol", "smoke",
        "--seeds", "7", "--tasks", "2", "--set", "epochs=2", "--set", "lr=0.05",
        "--opt", "soft_weight=0.25", "--bench-opt", "size=16", "--deterministic",
        "--workers", "1", "--threads", "3", "--checkpoint-every", "10m", "--search", "full",
        "--compile", "--no-progress"]


def test_every_field_has_a_flag_a_help_and_a_source():
    flags = run_flags()
    assert [name for name, _ in flags] == [f.name for f in fields(RunConfig)]
    names = [flag.name for _, flag in flags]
    assert len(set(names)) == len(names)
    for name, flag in flags:
        assert flag.name.startswith("--") and flag.help and flag.source, name
    # the parser's run flags are exactly these (plus --weights, an alias of --pretrained)
    parser = cli.parser()
    group = next(g for g in parser._action_groups if g.title == "run")
    assert {a.option_strings[-1] for a in group._group_actions} == {*names, "--weights"}


def test_the_plan_parses_into_configs_that_round_trip_through_json_and_argv(tmp_path):
    configs = cli.run_configs(cli.parser().parse_args([*PLAN, "--out", str(tmp_path)]))
    assert [(c.method, c.seed) for c in configs] == [("finetune", 7), ("ksm", 7)]
    ksm = configs[1]
    assert ksm.protocol_overrides == {"epochs": 2, "lr": 0.05}
    assert ksm.method_options == {"soft_weight": 0.25}  # only the method that takes it
    assert configs[0].method_options == {}
    assert (ksm.threads, ksm.search, ksm.compile, ksm.progress) == (3, "full", True, False)
    assert ksm.out == str(tmp_path.resolve())
    # as a job carries it: JSON, read back equal
    job = Job.from_json(Job("k", ksm.method, ksm.seed, {}, ksm.to_dict()).to_json())
    assert job.run_config() == ksm
    # the one-run command line it stands for parses back into the same configuration
    (again,) = cli.run_configs(cli.parser().parse_args(ksm.to_argv()))
    assert again == ksm


def test_defaults_leave_the_command_line_short_and_sources_say_where_values_come_from():
    cfg = RunConfig(method="nws")
    assert cfg.to_argv() == ["--method", "nws", "--seeds", "1993"]
    sources = RunConfig(method="nws", arch="resnet34").sources()
    assert sources["arch"] == "not the default" and "offline" in sources["benchmark"]


@pytest.mark.parametrize("value", [0.1, 3, "text", "true", "1", [1, 2], None, True, "a b"])
def test_an_option_value_is_written_as_it_is_read_back(value):
    argv = RunConfig(method="nws", method_options={"k": value}).to_argv()
    key, _, text = argv[argv.index("--opt") + 1].partition("=")
    assert key == "k" and parse_value(text) == value


def test_a_job_written_by_another_version_is_refused_naming_the_field():
    data = RunConfig(method="nws").to_dict() | {"colour": "red"}
    with pytest.raises(ValueError, match="colour"):
        RunConfig.from_dict(json.loads(json.dumps(data)))


@pytest.mark.parametrize("item", ["epochs", "=2", " =2"])
def test_a_pair_without_a_key_and_equals_exits_2_naming_it(item, tmp_path, capsys):
    code = cli.main(["--method", "finetune", "--benchmark", "synthetic", "--protocol",
                     "smoke", "--set", item, "--out", str(tmp_path / "out")])
    assert code == 2 and f"--set takes KEY=VALUE, got {item!r}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
