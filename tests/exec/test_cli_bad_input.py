"""Bad flags of the run/status/prefetch CLIs stop with exit 2 and a message naming what is
valid, before any job is planned or any data is read (never a raw traceback)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.core.device_policy import resolve_device
from benchmarks.core.protocols import resolve_protocol
from benchmarks.exec import run as cli
from benchmarks.exec import status

REPO = Path(__file__).resolve().parent.parent.parent
DIGITS = ["--method", "finetune", "--protocol", "smoke", "--tasks", "1"]


@pytest.mark.parametrize("extra, says", [
    (["--bench-opt", "foo=1"], "unknown --bench-opt key(s) foo for benchmark split_digits; "
                               "valid: size"),
    (["--bench-opt", "foo=1", "--launcher", "local", "--dry-run"], "valid: size"),
    (["--benchmark", "cub_to_sketches", "--bench-opt", "size=16"], "valid: verify, cache_dir"),
    (["--opt", "beta=0.3"], "--opt beta: no planned method takes it"),
    (["--method", "finetune,nws", "--opt", "nope=1"], "nws: "),
    (["--set", "epochs=abc"], "--set epochs='abc': epochs takes int"),
    (["--set", "lr_milestones=a"], "lr_milestones takes a comma-separated list of ints"),
    (["--set", "name=x"], "unknown protocol field(s) ['name']"),
    (["--launcher", "local", "--jobs", "0", "--dry-run"], "--jobs: '0': out of range"),
    (["--launcher", "local", "--jobs", "-1"], "--jobs: '-1': out of range"),
    (["--launcher", "slurm", "--parallelism", "0", "--dry-run"], "--parallelism: '0'"),
    (["--launcher", "local", "--threads", "0", "--dry-run"], "--threads: '0': out of range"),
    (["--threads", "0"], "--threads: '0': out of range; valid: an integer >= 1 and <= 1024"),
    (["--device", "cuda:99", "--launcher", "local", "--dry-run"], "CUDA device(s) visible"),
    (["--checkpoint-every", "1h30m", "--launcher", "local", "--dry-run"],
     "--checkpoint-every '1h30m': give a number of epochs"),
    (["--launcher", "slurm", "--cpus-per-job", "0", "--dry-run"], "--cpus-per-job: '0'"),
    (["--launcher", "slurm", "--mem-gb", "-1", "--dry-run"], "--mem-gb: '-1': out of range"),
    (["--checkpoint-dir", __file__], f"--checkpoint-dir {__file__} is a file; give a folder"),
    (["--kernels-dir", __file__, "--launcher", "local"], "--kernels-dir"),
])
def test_bad_values_exit_2_naming_the_valid_ones(extra, says, tmp_path, capsys):
    code = main_code([*DIGITS, "--out", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err
    assert not list(tmp_path.glob("*/config.json"))  # nothing ran


def main_code(argv: list[str]) -> int:
    """``benchmarks.exec.run.main``'s exit code, also where argparse exits (a flag's range)."""
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return stop.code


def test_out_that_is_a_file(tmp_path, capsys):
    afile = tmp_path / "results"
    afile.write_text("")
    for extra in ([], ["--launcher", "local"]):
        assert cli.main([*DIGITS, "--out", str(afile), *extra]) == 2
        assert f"--out {afile} is a file; give a folder" in capsys.readouterr().err
    from benchmarks.data import cub_to_sketches

    with pytest.raises(ValueError, match=f"cache_dir={afile}: {afile} is a file"):
        cub_to_sketches.build(tmp_path, cache_dir=str(afile))


def test_status_and_a_valid_key_of_one_planned_method(tmp_path, capsys):
    assert status.main([*DIGITS, "--bench-opt", "foo=1", "--results", str(tmp_path)]) == 2
    assert "valid: size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        status.main(["--bogus"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "python -m benchmarks.status: error: unrecognized" in err
    args = cli.parser().parse_args([*DIGITS, "--method", "finetune,nws", "--opt", "beta=0.3",
                                    "--set", "lr=1", "--set", "lr_milestones=2,3"])
    configs = cli.run_configs(args)  # beta goes to nws only; int lr is a float
    assert [c.method_options for c in configs] == [{}, {"beta": 0.3}]
    args = cli.parser().parse_args([*DIGITS, "--method", "nws, finetune,nws", "--seeds", "2",
                                    "1", "2"])  # once each, in the order given
    assert [(c.method, c.seed) for c in cli.run_configs(args)] == [
        ("nws", 2), ("finetune", 2), ("nws", 1), ("finetune", 1)]
    proto = resolve_protocol("smoke", "split_digits").with_overrides(lr=1, lr_milestones=2)
    assert proto.lr == 1.0 and isinstance(proto.lr, float) and proto.lr_milestones == (2,)


def test_a_device_that_is_not_one_or_not_visible_is_a_value_error():
    with pytest.raises(ValueError, match="--device 'foo' is not a device"):
        resolve_device("foo")
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device("cuda:99")
    assert resolve_device("cpu").type == "cpu"


_LAUNCHER = """
import argparse, sys
from benchmarks.exec.launch import local
from benchmarks.exec.sweep import Job
pid_file, out = sys.argv[1], sys.argv[2]
child = f"import os, time; open({pid_file!r}, 'w').write(str(os.getpid())); time.sleep(120)"
local.job_command = lambda *a, **k: [sys.executable, "-c", child]
args = argparse.Namespace(jobs=1, per_gpu=None, gpus=None, threads=1, out=out)
sys.exit(local.launch_local([Job("k", "finetune", 1, {})], args))
"""


def test_sigterm_to_the_local_launcher_stops_its_jobs(tmp_path):
    """Jobs run in their own sessions; a launcher ended by SIGTERM used to leave them running,
    orphaned. It now stops them as on Ctrl-C."""
    pid_file = tmp_path / "child.pid"
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(pid_file),
                                 str(tmp_path / "out")], env=env, cwd=REPO,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 1 and "launch again to resume" in err
    with pytest.raises(ProcessLookupError):  # the job was stopped and reaped
        os.kill(child, 0)


def test_a_damaged_or_foreign_run_config_is_named_and_nothing_changes(tmp_path, capsys):
    argv = ["--method", "finetune", "--benchmark", "synthetic", "--protocol", "smoke",
            "--tasks", "1", "--pretrained", "none", "--out", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    config = next(tmp_path.glob("*/config.json"))
    rows = (config.parent / "rows.csv").read_text()
    text = config.read_text()
    config.write_text(text.replace('"seed": 1993', '"seed": 7', 1))
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert "another configuration (differs in: seed)" in capsys.readouterr().err
    config.write_text("{damaged")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{config} is damaged" in err and "Traceback" not in err
    assert config.read_text() == "{damaged" and (config.parent / "rows.csv").read_text() == rows


def test_weights_a_folder_a_truncated_file_and_a_missing_file_for_a_sweep(tmp_path, capsys,
                                                                          monkeypatch):
    import torch

    assert cli.main([*DIGITS, "--out", str(tmp_path), "--weights", str(tmp_path)]) == 2
    assert f"weights file {str(tmp_path)!r} is a folder, not a file" in capsys.readouterr().err
    whole = tmp_path / "whole.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert cli.main([*DIGITS, "--out", str(tmp_path), "--weights", str(cut)]) == 2
    err = capsys.readouterr().err
    assert f"weights file {cut}: not a torch" in err and "download it again" in err
    assert "weights_only=False" not in err  # no unpickling advice for a file torch cannot read
    from safetensors.torch import save_file

    whole_st = tmp_path / "whole.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 3, 3)}, str(whole_st))
    cut.write_bytes(whole_st.read_bytes()[:-100])
    assert cli.main([*DIGITS, "--out", str(tmp_path), "--weights", str(cut)]) == 2
    err = capsys.readouterr().err
    assert "not a readable safetensors file" in err and "download it again" in err
    assert "weights_only=False" not in err
    code = cli.main([*DIGITS, "--out", str(tmp_path), "--weights", str(tmp_path / "nope.pt"),
                     "--launcher", "local", "--dry-run"])
    assert code == 2 and "nope.pt' not found" in capsys.readouterr().err
    other = tmp_path / "mobilenet.pt"  # another architecture: refused before any job
    torch.save({"conv1.weight": torch.zeros(64, 1, 7, 7)}, other)
    for extra in (["--launcher", "local", "--dry-run"], []):
        assert cli.main([*DIGITS, "--out", str(tmp_path), "--weights", str(other), *extra]) == 2
        err = capsys.readouterr().err
        assert "do not fit resnet18: shape mismatch in conv1.weight (64, 1, 7, 7)" in err
    from benchmarks.exec import prefetch

    monkeypatch.setenv("NWS_CPU_KERNELS", "0")  # no kernel build here
    assert prefetch.main([*DIGITS, "--weights", str(other)]) == 2  # it said "ok" before
    assert "missing  weights resnet18" in capsys.readouterr().out
    assert not list(tmp_path.glob("*/config.json"))


def test_a_relaunch_with_another_checkpoint_dir_takes_the_earlier_checkpoints_along(
        tmp_path, capsys):
    """Killed with --checkpoint-dir A, launched again without it: the checkpoints in A used to
    be ignored (the task silently trained again); they are moved to the new place."""
    scratch = tmp_path / "scratch"
    argv = ["--method", "finetune", "--benchmark", "synthetic", "--protocol", "smoke",
            "--tasks", "1", "--pretrained", "none", "--out", str(tmp_path / "runs"),
            "--no-progress"]
    assert cli.main([*argv, "--checkpoint-dir", str(scratch)]) == 0
    run_dir = next((tmp_path / "runs").glob("*/config.json")).parent
    left = scratch / run_dir.name / "task099-0-train.pt"  # a task this run never loads
    left.write_bytes(b"a phase checkpoint")
    # as killed before its rows were written (a finished run is reported done, untouched)
    (run_dir / "rows.csv").unlink()
    assert cli.main(argv) == 0
    moved = run_dir / "checkpoints" / left.name
    assert not left.exists() and moved.read_bytes() == b"a phase checkpoint"


def test_damaged_rows_and_job_records_are_named_not_a_traceback(tmp_path, capsys):
    argv = ["--method", "finetune", "--benchmark", "synthetic", "--protocol", "smoke",
            "--tasks", "1", "--pretrained", "none", "--out", str(tmp_path), "--no-progress",
            "--deterministic"]
    assert cli.main(argv) == 0
    run_dir = next(tmp_path.glob("*/config.json")).parent
    rows = run_dir / "rows.csv"
    good = rows.read_text()
    rows.write_text('run_id,task\n"unterminated')
    (run_dir / "job.json").write_text("{damaged")
    (tmp_path / ".sweep" / "jobs").mkdir(parents=True)
    (tmp_path / ".sweep" / "jobs" / "x.json").write_text("{damaged")
    capsys.readouterr()
    assert status.main(["--results", str(tmp_path)]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if run_dir.name in x)
    assert line.startswith("damaged") and f"{rows} is damaged" in line  # issue 21: not partial
    assert "job record ignored: unreadable job.json" in line
    assert cli.main(argv) == 2
    assert f"{rows} is damaged" in capsys.readouterr().err
    rows.unlink()  # as the message says: the stored task is evaluated again, not retrained
    assert cli.main(argv) == 0
    # the same rows, from the store (task_seconds: this launch's wall time, evaluation only)
    same = [pd.read_csv(io.StringIO(t)) for t in (rows.read_text(), good)]
    pd.testing.assert_frame_equal(*(f[f.metric != "task_seconds"] for f in same))


def test_the_decode_cache_bar_only_on_a_terminal(monkeypatch):
    """Its bar ignored the terminal test of every other bar: a job's log got tqdm frames."""
    import io

    from benchmarks.data.decode_cache import DecodedImages

    def made() -> DecodedImages:
        return DecodedImages([], lambda im: im, 8, None, None, "x")

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert made().progress is False
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", tty)
    assert made().progress is True


def test_a_tree_with_an_extra_folder_level_is_refused_not_one_class(tmp_path):
    """<split>/images/<class>/x.jpg used to be read as a single class 'images' (a warning,
    then a trivial one-class task): every label wrong, silently."""
    from benchmarks.data import cub_to_sketches
    from tests.fakes import write_image_folder

    for name, _, _ in cub_to_sketches.DATASETS:
        for split in ("train", "test"):
            level = "images" if name == "cubs_cropped" else ""
            write_image_folder(tmp_path / name / split / level, ["a", "b"])
    problems = cub_to_sketches.check_layout(tmp_path)
    assert len(problems) == 2 and all("one class folder ('images')" in p for p in problems)
    assert "cubs_cropped/train/<class>/<images>" in problems[0]
