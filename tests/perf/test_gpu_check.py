"""The GPU acceptance check (``benchmarks.gpu_check``): its CPU dry mode runs here; the CUDA
parts carry the ``cuda`` marker and are skipped without a GPU (``tox -e gpu`` runs them)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.perf import gpu_check
from benchmarks.perf.gpu_check import main, paper_steps

CUDA = torch.device("cuda")


def test_dry_run_on_cpu_reports_steps_and_projection(tmp_path, capsys):
    """Two methods, tiny settings, the step check (syncs counted on the CUDA code path) and
    the table; the harness, search and resume checks have their own tests below."""
    rc = main(["--device", "cpu", "--method", "finetune,packnet", "--batch", "2", "--size",
               "16", "--steps", "1", "--warmup", "1", "--compile", "off", "--skip",
               "task,search,resume", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "[PASS] steps packnet fp32" in out and "no host sync" in out
    assert "| packnet | fp32 |" in out and "Projected paper protocol" in out
    assert (tmp_path / "report.json").exists()


def test_a_sync_in_the_step_fails_the_check(monkeypatch, capsys, tmp_path):
    from baselines.packnet import PackNet

    original = PackNet.after_step

    def syncing(self, model):  # a host read in every step, as a regression would add
        original(self, model)
        float(next(model.parameters()).detach().sum())

    monkeypatch.setattr(PackNet, "after_step", syncing)
    rc = main(["--device", "cpu", "--method", "packnet", "--batch", "2", "--size", "16",
               "--steps", "1", "--warmup", "1", "--compile", "off", "--skip",
               "task,search,resume", "--out", str(tmp_path)])
    assert rc == 1
    assert "_local_scalar_dense" in capsys.readouterr().out


def test_bad_input_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", "--method", "nope"])
    assert exit_info.value.code == 2
    assert "unknown method" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_info:
            main(["--device", "cuda"])
        assert exit_info.value.code == 2
        assert "--device cpu" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--batch", "1"), ("--steps", "0"), ("--warmup", "0"),
                                        ("--size", "0"), ("--resume-images", "1")])
def test_sizes_too_small_exit_2_naming_the_flag(flag, value, capsys):
    """Was: a FAIL row per method (BatchNorm's ValueError, an UnboundLocalError for 0 steps)
    and a table of nan, as if the methods had failed."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", flag, value])
    assert exit_info.value.code == 2
    assert f"{flag} {value}: give" in capsys.readouterr().err


def test_the_projection_shows_only_timed_modes_and_flags_other_sizes():
    """Was: with --compile off the compiled total repeated the eager one ("compiled where it
    ran" = eager), with --compile on the eager total was nan, and a batch-4 dry run printed
    a projected protocol time as if measured at the protocol's batch."""
    from benchmarks.perf.gpu_check import Report, Timing, table

    report = Report("cpu", timings=[Timing("finetune", "fp32", False, 0.05, True)])
    hours = 3 * paper_steps("finetune") / 0.05 / 3600
    text = table(report, batch=32, size=32)
    assert f"eager {hours:.2f} h" in text and "compiled" not in text.split("\n")[-1]
    assert "| finetune | fp32 | 0.05 | - |" in text  # small rates keep their digits
    assert "not a projection" not in text
    assert "not a projection of the protocol" in table(report, batch=4, size=16)
    only_compiled = Report("cpu", timings=[Timing("finetune", "fp32", True, 2.0, True)])
    last = table(only_compiled).split("\n")[-1]
    assert "compiled where it ran" in last and "eager" not in last and "nan" not in last


def test_a_compiled_cpu_step_says_its_syncs_were_counted_eagerly(monkeypatch, capsys):
    """Measured: under the op counter a compiled CPU step dispatches the eager step's ops
    (297 = 297 for finetune, batch 2, 16x16), so its PASS must not read as a check of the
    compiled graph."""
    from benchmarks.perf.gpu_check import Report, Timing, check_steps

    monkeypatch.setattr(gpu_check, "time_steps", lambda m, a, c, d, **kw: Timing(m, a, c, 5.0,
                                                                                   True))
    report = Report("cpu")
    check_steps(report, ["finetune"], ["fp32"], [False, True], torch.device("cpu"))
    eager, compiled = (c.detail for c in report.checks)
    assert "eager ops" not in eager and "counted on the eager ops" in compiled


def test_paper_protocol_step_count():
    assert paper_steps("nws") == 20 * 100 * 79
    assert paper_steps("packnet") == 20 * 130 * 79  # + 30 retraining epochs per task


def test_the_resume_verdict_needs_steps_after_the_resume_and_equal_results():
    """The rerun must resume (a logged step), train after it, and end where an uninterrupted
    run ends; the old check passed a rerun that trained 0 steps."""
    done = {("accuracy", 0, 0): 0.5, ("train_steps", 0, 0): 16.0,
            ("final_train_loss", 0, 0): 1.25}
    verdict = gpu_check.resume_verdict
    assert verdict([4], done, dict(done)) == ("PASS", verdict([4], done, done)[1])
    assert "resumed at step 4, trained 12 more" in verdict([4], done, done)[1]
    assert verdict([16, 4], done, done)[0] == "FAIL"  # its last phase was already done
    assert "did not resume from a checkpoint" in verdict([], done, done)[1]
    other = done | {("accuracy", 0, 0): 0.5 + 2 ** -20}
    status, detail = verdict([4], done, other)
    assert status == "FAIL" and "('accuracy', 0, 0): (0.5, 0.500000953" in detail
    assert verdict([4], done, {k: v for k, v in done.items() if k[0] != "accuracy"})[0] == "FAIL"


def test_the_resume_log_line_carries_the_step():
    line = "INFO [packnet s0] task 1/1 t0 [train]: resumed after epoch 1/4 (step 4) from x.pt"
    assert [m.group(3) for m in gpu_check.RESUMED.finditer(line)] == ["4"]


@pytest.mark.slow
def test_search_and_resume_checks_run_on_cpu(tmp_path):
    report = gpu_check.Report("cpu")
    gpu_check.check_search(report, torch.device("cpu"), arch="resnet18", batch=2, size=16,
                           max_rows=2048)
    gpu_check.check_resume(report, torch.device("cpu"), tmp_path, size=16, images=128)
    assert [c.status for c in report.checks] == ["PASS", "PASS"], report.checks
    assert "trained" in report.checks[1].detail and "equals the uninterrupted" in \
        report.checks[1].detail


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["fp32", "bf16", "fp16"])
def test_every_method_learns_a_task_on_cuda(amp, tmp_path):
    report = gpu_check.Report("cuda")
    gpu_check.check_tasks(report, gpu_check.METHODS.names(), [amp], CUDA, 32, tmp_path)
    assert not report.failed, report.checks


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["finetune", "ksm", "packnet", "aqd", "nws"])
def test_steady_state_steps_have_no_host_sync_on_cuda(method):
    for amp in ("fp32", "bf16", "fp16"):
        t = gpu_check.time_steps(method, amp, False, CUDA, arch="resnet18", batch=32, size=32,
                                 warmup=3, steps=3)  # sync debug mode "error" raises
        assert t.syncs_ok and t.steps_per_s, t


@pytest.mark.cuda
def test_nws_search_equals_float64_and_resume_on_cuda(tmp_path):
    report = gpu_check.Report("cuda")
    gpu_check.check_search(report, CUDA, arch="resnet18", batch=32, size=32, max_rows=None)
    gpu_check.check_resume(report, CUDA, tmp_path, size=32, images=4096)
    assert not report.failed, report.checks
