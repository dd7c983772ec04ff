"""Sweeps and launchers: the run-folder lock, the local launcher against inline runs, a killed
job resumed (also through a SLURM requeue), the SLURM array through a fake ``sbatch``, status,
and the kernel build's bounded wait."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.core.lock import RunLock, is_locked, read_holder
from benchmarks.core.results import TIMING_METRICS, load_rows
from benchmarks.core.store import ArtifactStore
from benchmarks.exec import run as cli
from benchmarks.exec.launch import plan_jobs
from benchmarks.exec.launch.job import job_command, run_job
from benchmarks.exec.records import read_record
from benchmarks.exec.status import job_status
from benchmarks.exec.sweep import find_run_dir

REPO = Path(__file__).resolve().parent.parent.parent
ENV = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
SYNTH = ["--method", "finetune", "--benchmark", "synthetic", "--protocol", "smoke",
         "--deterministic"]


def _jobs(args: list[str]):
    p = cli.parser()
    return plan_jobs(p.parse_args(args))


def _results(out: Path) -> pd.DataFrame:
    """Every row but wall-clock time and the run id, in a fixed order."""
    df = load_rows(out)
    df = df[~df.metric.isin(TIMING_METRICS)].drop(columns="run_id")
    return df.sort_values(["method", "seed", "after_task", "task", "metric"]).reset_index(
        drop=True)


def test_a_second_process_on_a_run_stops_with_the_holder_and_the_first_finishes(tmp_path):
    """Two real processes: the first runs the harness, held inside its first training step
    until the second has tried; the second exits 2 naming the first's host and pid."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time, pathlib
from benchmarks.engine import training; from benchmarks.exec import run
step = training.Trainer.step
def gated(self, x, y):
    while not pathlib.Path({str(gate)!r}).exists():
        time.sleep(0.05)
    return step(self, x, y)
training.Trainer.step = gated
raise SystemExit(run.main({[*SYNTH, "--seeds", "5", "--tasks", "1", "--out", str(out)]!r}))
"""], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(out.glob("*/run.lock")) or not read_holder(next(out.glob("*"))):
        assert holder.poll() is None and time.time() < deadline, holder.stdout.read()
        time.sleep(0.1)
    run_dir = next(out.glob("*"))
    assert is_locked(run_dir)
    second = subprocess.run([sys.executable, "-m", "benchmarks.run", *SYNTH, "--seeds", "5",
                             "--tasks", "1", "--out", str(out)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert f"pid {holder.pid}" in second.stderr and "in use by another process" in second.stderr
    assert "Traceback" not in second.stderr
    gate.touch()
    assert holder.wait(timeout=300) == 0, holder.stdout.read()
    rows = load_rows(run_dir)
    assert set(rows[(rows.metric == "accuracy") & (rows.task == rows.after_task)].task) == {0}
    assert ArtifactStore(run_dir / "artifacts").tasks() == [0]  # nothing of the first's lost
    assert not is_locked(run_dir)  # released at the end: a later run takes it at once
    with RunLock(run_dir):
        assert read_holder(run_dir)["pid"] == os.getpid()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", f"""
from benchmarks.core.lock import RunLock
import time
RunLock({str(tmp_path)!r}).acquire(); print("held", flush=True); time.sleep(600)
"""], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    assert is_locked(tmp_path) and read_holder(tmp_path)["pid"] == proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with RunLock(tmp_path):  # the kernel released the dead holder's flock
        assert read_holder(tmp_path)["pid"] == os.getpid()


def test_the_plan_is_methods_by_seeds_and_dry_run_prints_it(tmp_path, capsys):
    jobs = _jobs([*SYNTH, "--method", "finetune,packnet", "--seeds", "1", "2",
                  "--set", "epochs=2", "--out", str(tmp_path)])
    assert [(j.method, j.seed) for j in jobs] == [("finetune", 1), ("packnet", 1),
                                                  ("finetune", 2), ("packnet", 2)]
    assert jobs[1].config["protocol_overrides"] == {"epochs": 2}  # the job carries data
    argv = jobs[1].argv()  # the one-run command line it stands for
    assert argv[:4] == ["--method", "packnet", "--seeds", "1"]
    assert argv[argv.index("--set"):argv.index("--set") + 2] == ["--set", "epochs=2"]
    assert str(tmp_path) in argv and "--launcher" not in argv
    code = cli.main([*SYNTH, "--method", "finetune,packnet", "--seeds", "1", "2", "--out",
                     str(tmp_path), "--launcher", "local", "--jobs", "2", "--dry-run"])
    table = capsys.readouterr().out
    assert code == 0 and "4 runs" in table and table.count("python -m benchmarks.run") == 4
    assert not list(tmp_path.glob("*/config.json"))  # nothing ran


def test_threads_progress_and_gpu_slots(monkeypatch):
    import torch

    from benchmarks.exec.launch.local import slots_for

    args = cli.parser().parse_args([*SYNTH, "--threads", "1"])
    assert all(not cfg.progress for cfg in cli.run_configs(args))  # stderr is not a terminal
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        cli.apply_process_settings(args)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)
    p = cli.parser()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert slots_for(p.parse_args(["--per-gpu", "2", "--gpus", "0,3"])) == ["0", "3", "0", "3"]
    assert slots_for(p.parse_args(["--jobs", "3"])) == [None, None, None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert slots_for(p.parse_args(["--per-gpu", "2"])) == ["5", "5"]


def _fake_gpus(monkeypatch, count: int, visible: str | None) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def test_two_jobs_on_two_gpus_take_one_each(monkeypatch):
    """``--per-gpu 2 --jobs 2 --gpus 0,1`` used to pack both jobs on GPU 0."""
    from benchmarks.exec.launch.local import pick_slot, slots_for

    _fake_gpus(monkeypatch, 2, None)
    args = cli.parser().parse_args(["--per-gpu", "2", "--jobs", "2", "--gpus", "0,1"])
    assert slots_for(args) == ["0", "1"]
    # all four slots of 2 GPUs x 2: a job starts on the GPU running fewest jobs
    slots = ["0", "1", "0", "1"]
    free, busy = [0, 1, 2, 3], []
    for _ in range(3):
        busy.append(pick_slot(free, slots, busy))
    assert [slots[b] for b in busy] == ["0", "1", "0"]
    # slots 0 and 1 free, in that order; GPU 0 runs slot 2's job, GPU 1 nothing: the next
    # job starts on GPU 1 although slot 0 (GPU 0) was freed first
    assert pick_slot([0, 1], slots, [2]) == 1
    assert pick_slot([0, 3], slots, [1, 2]) == 0  # one job each: the earliest slot


@pytest.mark.parametrize("gpus, visible, count, shown", [
    ("7", None, 2, "GPU 7 not visible; visible here (physical ids): 0, 1"),
    ("0", "2,3", 2, "GPU 0 not visible; visible here (physical ids): 2, 3"),
    ("0", "-1", 2, "no GPU is visible here ($CUDA_VISIBLE_DEVICES='-1')"),
    ("-1", None, 2, "--gpus '-1': give physical GPU ids"),
    ("", None, 2, "--gpus '': give physical GPU ids"),
    ("0,,1", None, 2, "--gpus '0,,1': give physical GPU ids"),
    ("1,1", None, 2, "an id is repeated"),
    ("1", "0,1", 1, "GPU 1 not visible; visible here (physical ids): 0 "),
])
def test_gpus_not_visible_here_are_refused(monkeypatch, capsys, tmp_path, gpus, visible, count,
                                           shown):
    """Checked before any job starts, exit 2 naming the visible GPUs (before: ``--gpus 7`` or
    ``CUDA_VISIBLE_DEVICES=-1`` ran every job on the CPU with exit 0)."""
    _fake_gpus(monkeypatch, count, visible)
    code = cli.main([*SYNTH, "--out", str(tmp_path), "--launcher", "local", "--per-gpu", "1",
                     "--gpus", gpus, "--dry-run"])
    assert code == 2 and shown in capsys.readouterr().err
    assert not (tmp_path / ".sweep").exists()


def test_per_gpu_without_a_visible_gpu_is_refused(monkeypatch, capsys, tmp_path):
    _fake_gpus(monkeypatch, 0, None)
    code = cli.main([*SYNTH, "--out", str(tmp_path), "--launcher", "local", "--per-gpu", "2",
                     "--dry-run"])
    assert code == 2 and "no GPU is visible here; use --jobs N" in capsys.readouterr().err
    _fake_gpus(monkeypatch, 2, "3,-1,0")  # CUDA stops at the first negative entry
    from benchmarks.exec.launch.local import visible_gpus

    assert visible_gpus() == ["3"]


def test_gpus_help_says_physical_ids():
    text = " ".join(cli.parser().format_help().split())
    assert "physical GPU ids" in text


@pytest.mark.slow
def test_local_launcher_gives_the_inline_results(tmp_path):
    """2 methods x 2 seeds of split_digits as 4 real processes, 2 at a time."""
    common = ["--benchmark", "split_digits", "--protocol", "smoke", "--deterministic",
              "--tasks", "1", "--method", "finetune,packnet", "--seeds", "1993", "1994",
              "--bench-opt", "size=16", "--threads", "1"]
    assert cli.main([*common, "--out", str(tmp_path / "inline")]) == 0
    local = subprocess.run([sys.executable, "-m", "benchmarks.run", *common, "--out",
                            str(tmp_path / "local"), "--launcher", "local", "--jobs", "2"],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stdout + local.stderr
    lines = [line for line in local.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 4 and all(" done in " in line for line in lines), local.stdout
    assert "ETA" in lines[0] and "sweep took" in lines[-1]
    pd.testing.assert_frame_equal(_results(tmp_path / "inline"), _results(tmp_path / "local"))
    logs = list((tmp_path / "local" / ".sweep" / "logs").glob("*.log"))
    assert len(logs) == 4 and all("task 1/1" in log.read_text() for log in logs)
    assert all("task 1 [train] epoch 1/1: loss" in log.read_text() for log in logs)  # no bars


@pytest.mark.slow
def test_a_killed_job_resumes_to_the_uninterrupted_results_also_via_a_slurm_requeue(
        tmp_path):
    """The job process local starts, SIGKILLed after its first task, then requeued as SLURM
    would (``RunJob.checkpoint``'s DelayedSubmission, run here): the results equal an
    uninterrupted run's."""
    from benchmarks.exec.launch.slurm import RunJob

    args = [*SYNTH, "--seeds", "3", "--tasks", "2", "--set", "epochs=2"]
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    (job,) = _jobs([*args, "--out", str(out)])
    proc = subprocess.Popen(job_command(job, out, None, {}), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "task 1/2" in line:
            proc.kill()
            break
    proc.wait(timeout=60)
    run_dir = find_run_dir(out, job)
    assert job_status(out, job).state == "partial" and job_status(out, job).learned == 1
    requeued = RunJob(str(out), {"time": 5}).checkpoint(job)
    assert requeued.args == (job,)  # the same job again
    assert requeued.result() == 0
    assert job_status(out, job).state == "done" and read_record(out, job.key)["state"] == "done"
    assert json.loads((run_dir / "job.json").read_text())["launcher"]["time"] == 5
    pd.testing.assert_frame_equal(_results(tmp_path / "whole"), _results(out))


def test_slurm_array_through_a_fake_sbatch(tmp_path, monkeypatch, capsys):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\ncp "$1" {tmp_path}/batch.sh\n'
        'echo "Submitted batch job 123"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = tmp_path / "slurm.json"
    config.write_text(json.dumps({"partition": "gpu", "time": "1:30:00", "mem_gb": 16,
                                  "sbatch": {"account": "abc"}}))
    out = tmp_path / "out"
    code = cli.main([*SYNTH, "--method", "finetune,packnet", "--seeds", "1", "2", "--out",
                     str(out), "--launcher", "slurm", "--slurm-config", str(config),
                     "--parallelism", "2", "--gpus-per-job", "1", "--cpus-per-job", "4",
                     "--sbatch", "qos=high"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert len(calls.read_text().splitlines()) == 1  # one array, not four jobs
    script = (tmp_path / "batch.sh").read_text()
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --time=90", "#SBATCH --partition=gpu",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem=16384M", "#SBATCH --account=abc", "#SBATCH --qos=high"):
        assert line in script, script
    assert "123_0" in printed and "123_3" in printed and ".sweep/slurm" in printed
    folder = out / ".sweep" / "slurm"
    commands = []
    for i in range(4):
        with open(folder / f"123_{i}_submitted.pkl", "rb") as fh:
            submission = pickle.load(fh)
        (job,) = submission.args
        assert submission.function.settings["partition"] == "gpu"
        commands.append(job.run_config())
    assert [(c.method, c.seed) for c in commands] == [("finetune", 1), ("packnet", 1),
                                                      ("finetune", 2), ("packnet", 2)]
    assert all(c.threads == 4 and not c.progress for c in commands)


def test_status_reports_done_running_partial_failed_and_missing(tmp_path, monkeypatch,
                                                                capsys):
    from benchmarks.engine import training
    from benchmarks.exec.status import main as status

    plan = [*SYNTH, "--seeds", "1", "2", "3", "4", "--tasks", "2", "--out", str(tmp_path)]
    done, partial, failed, missing = _jobs(plan)
    assert run_job(done, tmp_path) == 0
    assert run_job(partial, tmp_path) == 0
    rows_csv = find_run_dir(tmp_path, partial) / "rows.csv"
    rows = pd.read_csv(rows_csv)
    rows[rows.after_task == 0].to_csv(rows_csv, index=False)  # as if killed after task 0

    def broken(self, x, y):
        raise RuntimeError("boom: out of memory")

    monkeypatch.setattr(training.Trainer, "step", broken)
    with pytest.raises(RuntimeError, match="boom"):
        run_job(failed, tmp_path, log="/logs/failed.log")
    monkeypatch.undo()

    flags = plan[:-2]
    assert status(["--results", str(tmp_path), *flags]) == 1
    lines = capsys.readouterr().out.splitlines()
    by_seed = {s: next(line for line in lines if f"-s{s}-" in line) for s in (1, 2, 3, 4)}
    assert by_seed[1].startswith("done") and "2/2 tasks" in by_seed[1]
    assert by_seed[2].startswith("partial") and "1/2 tasks" in by_seed[2]
    assert "last progress" in by_seed[2]
    assert by_seed[3].startswith("failed") and "RuntimeError: boom: out of memory" in by_seed[3]
    assert "log: /logs/failed.log" in by_seed[3]
    assert by_seed[4].startswith("missing")
    assert lines[-1] == "1 done, 1 partial, 1 failed, 1 missing"
    with RunLock(find_run_dir(tmp_path, partial)):  # as a live job holds it
        assert job_status(tmp_path, partial).state == "running"
    assert status(["--results", str(tmp_path)]) == 1  # without a plan: the folders found
    assert capsys.readouterr().out.splitlines()[-1] == "1 done, 1 partial, 1 failed"
    assert job_status(tmp_path, missing).state == "missing"


def test_a_stale_torch_build_lock_falls_back_to_eager_within_the_wait(tmp_path, monkeypatch):
    """An old torch's lock file left by a killed build, and a build lock held by a live
    process: each falls back to the eager code after the bounded wait (1 s here)."""
    from nws import cpu_kernels

    monkeypatch.setenv(cpu_kernels.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(cpu_kernels.WAIT_ENV, "1")
    monkeypatch.setattr(cpu_kernels, "_torch_lock_file_blocks", lambda: True)  # torch < FileLock
    folder = cpu_kernels.build_directory("nws_cpu_kernels_avx2").parent
    assert folder == tmp_path
    for isa in ("avx2", "base"):
        (tmp_path / f"nws_cpu_kernels_{isa}").mkdir()
        (tmp_path / f"nws_cpu_kernels_{isa}" / "lock").touch()
    start = time.monotonic()
    with pytest.warns(UserWarning, match="stale|delete it"):
        assert cpu_kernels._build() is None
    assert 0.9 < time.monotonic() - start < 10

    monkeypatch.setattr(cpu_kernels, "_torch_lock_file_blocks", lambda: False)
    held = [open(tmp_path / f"nws_cpu_kernels_{isa}" / "nws.build.lock", "w")  # noqa: SIM115
            for isa in ("avx2", "base")]
    import fcntl

    holder = subprocess.Popen([sys.executable, "-c", """
import fcntl, sys, time
fhs = [open(p, "a") for p in sys.argv[1:]]
for fh in fhs: fcntl.flock(fh, fcntl.LOCK_EX)
print("held", flush=True); time.sleep(600)
""", *(fh.name for fh in held)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BlockingIOError):
            fcntl.flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        start = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cpu_kernels._build() is None
        assert 0.9 < time.monotonic() - start < 10
        assert any("building in" in str(w.message) for w in caught)
    finally:
        holder.kill()
        holder.wait()
        for fh in held:
            fh.close()


def test_prefetch_says_what_is_missing_and_exits_2(tmp_path, monkeypatch, capsys):
    from benchmarks.exec.prefetch import main as prefetch
    from nws import cpu_kernels

    monkeypatch.setenv(cpu_kernels.ENV, "0")  # building is tested elsewhere; 30 s here
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    assert prefetch(["--method", "all", "--benchmark", "split_digits"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok       data split_digits: 5 tasks")
    assert lines[1].startswith("ok       weights resnet18: none needed")
    assert lines[2].startswith("warning  NWS CPU kernels: disabled")

    code = prefetch(["--benchmark", "split_cifar100", "--protocol", "paper", "--data-root",
                     str(tmp_path), "--bench-opt", "download=false",
                     "--weights", str(tmp_path / "resnet18.pt"), "--launcher", "slurm"])
    captured = capsys.readouterr()
    assert code == 2
    assert "missing  data split_cifar100: " in captured.out and str(tmp_path) in captured.out
    assert "missing  weights resnet18" in captured.out and "resnet18.pt" in captured.out
    assert "error: missing: data split_cifar100, weights resnet18" in captured.err


def test_a_requeue_exit_is_not_recorded_as_a_failure(tmp_path, monkeypatch):
    """submitit requeues on SLURM's timeout signal by exiting (SystemExit) mid-run: the run is
    left partial, to be resumed, not failed."""
    from benchmarks.engine import training

    (job,) = _jobs([*SYNTH, "--seeds", "9", "--tasks", "1", "--out", str(tmp_path)])

    def timed_out(self, x, y):
        raise SystemExit(-1)

    monkeypatch.setattr(training.Trainer, "step", timed_out)
    with pytest.raises(SystemExit):
        run_job(job, tmp_path)
    assert read_record(tmp_path, job.key) is None
    status = job_status(tmp_path, job)
    assert (status.state, status.learned, status.planned) == ("partial", 0, 1)


def test_status_of_a_sweep_not_started_lists_every_run_missing(tmp_path, capsys):
    from benchmarks.exec.status import main as status

    out = tmp_path / "not-yet"  # no folder: nothing has run
    assert status([*SYNTH, "--seeds", "1", "2", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert text.count("missing") >= 2 and "2 missing" in text
    assert status(["--results", str(out)]) == 2  # no plan: nothing to list
