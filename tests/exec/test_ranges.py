"""Values checked by range, not only type (benchmarks.core.checks): every protocol field, method
option, benchmark option and count flag declares its range with a reason; a value outside
stops with exit 2 naming the value and the range, before any run folder exists (was: 0
epochs or batches exit 0 with an untrained model tabled, batch 0 or pool_size 0 tracebacks,
pool_size 1e9 a 196 GB allocation, SLURM --time 25:99 read as 1599 min, --mem-gb nan)."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest
import torch

from benchmarks.core.protocols import PROTOCOLS, RULES, Protocol, resolve_protocol
from benchmarks.data import BENCHMARKS
from benchmarks.exec import run as cli
from benchmarks.exec.launch.slurm import minutes, settings_from
from benchmarks.methods.table import METHODS
from benchmarks.perf.conformance_diff import settings_violations

DIGITS = ["--method", "finetune", "--protocol", "smoke", "--tasks", "1"]


def _code(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as stop:  # argparse: a flag's range
        return stop.code


@pytest.mark.parametrize("extra, says", [
    (["--set", "epochs=-1"], "--set epochs=-1: out of range; valid: an integer >= 1"),
    (["--set", "epochs=0"], "--set epochs=0"),
    (["--set", "batch_size=-4"], "--set batch_size=-4"),
    (["--set", "batch_size=0"], "--set batch_size=0"),
    (["--set", "eval_batch_size=0"], "--set eval_batch_size=0"),
    (["--set", "max_steps_per_epoch=0"], "--set max_steps_per_epoch=0"),
    (["--set", "lr=0"], "--set lr=0"),
    (["--set", "lr=nan"], "lr takes float"),  # 'nan' is no literal: the type check says so
    (["--set", "lr=1e400"], "--set lr=inf: not a finite number"),
    (["--set", "lr=-0.1"], "--set lr=-0.1"),
    (["--set", "lr_gamma=0"], "--set lr_gamma=0"),
    (["--set", "momentum=1"], "--set momentum=1"),
    (["--set", "weight_decay=-1e-4"], "--set weight_decay=-0.0001"),
    (["--set", "lr_milestones=3,2"], "not increasing"),
    (["--set", "lr_milestones=0"], "--set lr_milestones=(0,)"),
    (["--set", "optimizer='rmsprop'"], "valid: one of 'sgd', 'adam'"),
    (["--set", "amp='fp8'"], "valid: one of 'none', 'bf16', 'fp16'"),
    (["--method", "nws", "--opt", "pool_size=0"], "--opt pool_size=0: out of range"),
    (["--method", "nws", "--opt", "pool_size=-3"], "--opt pool_size=-3"),
    (["--method", "nws", "--opt", "pool_size=1e9"], "--opt pool_size=1000000000.0: not an "
                                                    "integer"),
    (["--method", "nws", "--opt", "pool_size=1000000000"], "<= 65536"),
    (["--method", "nws", "--opt", "group_size=0"], "--opt group_size=0"),
    (["--method", "nws", "--opt", "group_size=3"], "--opt group_size=3"),
    (["--method", "nws", "--opt", "pools=nope.pt"], "nope.pt': no file /"),
    (["--method", "nws", "--opt", "kmeans_points=100"], "kmeans_points=100 is below"),
    (["--method", "nws", "--opt", "codec='zip'"], "--opt codec='zip'"),
    (["--method", "nws", "--opt", "keyframe_every=-2"], "--opt keyframe_every=-2"),
    (["--method", "nws", "--opt", "beta=-1"], "--opt beta=-1"),
    (["--method", "ksm", "--opt", "temperature=0"], "--opt temperature=0"),
    (["--method", "ksm", "--opt", "quick_epochs=0"], "--opt quick_epochs=0"),
    (["--method", "packnet", "--opt", "prune=1.0"], "--opt prune=1.0"),
    (["--method", "packnet", "--opt", "quick_retrain=(1.0,)"], "1 values"),
    (["--method", "aqd", "--opt", "weight_bits=0"], "--opt weight_bits=0"),
    (["--method", "aqd", "--opt", "act_bits=9"], "--opt act_bits=9"),
    (["--bench-opt", "size=100000000"], "--bench-opt size=100000000: out of range"),
    (["--benchmark", "synthetic", "--bench-opt", "n_train=0"], "--bench-opt n_train=0"),
    (["--workers", "-1"], "--workers: '-1': out of range"),
    (["--threads", "100000000"], "--threads: '100000000': out of range"),
    (["--tasks", "0"], "--tasks: '0'"),
    (["--seeds", "-1"], "--seeds: '-1'"),
    (["--launcher", "slurm", "--time", "0", "--dry-run"], "--time=0: out of range"),
    (["--launcher", "slurm", "--time", "25:99", "--dry-run"], "99 is past its unit"),
    (["--launcher", "slurm", "--mem-gb", "nan", "--dry-run"], "--mem-gb: 'nan': not a finite"),
    (["--launcher", "slurm", "--gpus-per-job", "-1", "--dry-run"], "--gpus-per-job: '-1'"),
    (["--launcher", "slurm", "--max-requeue", "-1", "--dry-run"], "--max-requeue: '-1'"),
    (["--launcher", "local", "--per-gpu", "0", "--dry-run"], "--per-gpu: '0'"),
])
def test_a_value_out_of_range_exits_2_naming_it_before_any_work(extra, says, tmp_path,
                                                                 capsys):
    code = _code([*DIGITS, "--out", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("*/config.json"))  # nothing ran


def test_a_weights_file_as_pools_exits_2_naming_it(tmp_path, capsys):
    weights = tmp_path / "w.pt"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3)}, weights)
    code = _code([*DIGITS, "--method", "nws", "--out", str(tmp_path / "runs"), "--opt",
                  f"pools={weights}"])
    err = capsys.readouterr().err
    assert code == 2 and f"{weights} is no pools file" in err and "Traceback" not in err


def test_every_field_and_option_declares_a_range_its_defaults_satisfy():
    """Find-them-all guard: a field or option added without a range fails here."""
    settable = {f.name for f in dataclasses.fields(Protocol)} - {"name", "provenance"}
    assert set(RULES) == settable
    for name in PROTOCOLS.names():
        for bench in BENCHMARKS.names():
            resolve_protocol(name, bench)  # checks every field of every protocol
    for method in METHODS.names():  # the conformance check's (e): source, range, default
        assert settings_violations(METHODS.get(method)) == [], method


def test_the_slurm_time_forms_are_sbatchs_and_config_values_are_checked(tmp_path):
    assert [minutes(t) for t in ("90", "30:00", "1:30:00", "2-3", "2-3:04", "0:30")] == \
        [90, 30, 90, 3060, 3064, 1]
    for bad in ("25:99", "1:99:00", "1-24", "0", 0, math.nan, "1h"):
        with pytest.raises(ValueError, match="--time"):
            minutes(bad)
    config = tmp_path / "slurm.json"
    config.write_text('{"mem_gb": -2}')
    args = argparse.Namespace(slurm_config=str(config), partition=None, time=None,
                              slurm_gpus=None, slurm_cpus=None, mem_gb=None, parallelism=None,
                              sbatch=None, max_requeue=3)
    with pytest.raises(ValueError, match="slurm mem_gb=-2: out of range"):
        settings_from(args)
