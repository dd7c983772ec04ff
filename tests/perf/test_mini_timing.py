"""The quick-start timing script runs exactly tox's mini commands, redirected, and sums the
runs' own timing rows per method."""

from __future__ import annotations

import sys

import pandas as pd
import pytest

from benchmarks.perf.mini_timing import ROOT, mini_commands, per_method


def test_commands_are_tox_minis_redirected(tmp_path):
    cmds = mini_commands(ROOT / "tox.ini", tmp_path, ["--bench-opt", "size=16"])
    modules = [c[c.index("-m") + 1] for c in cmds]
    assert modules == ["benchmarks.run", "analysis.tables", "analysis.figures", "analysis.report"]
    assert all(c[0] == sys.executable for c in cmds)
    run, tables, figures, report = cmds
    assert report[report.index("--out") + 1] == str(tmp_path / "tables" / "report.html")
    assert run[run.index("--out") + 1] == str(tmp_path / "runs")
    assert run[run.index("--bench-opt"): run.index("--bench-opt") + 2] == ["--bench-opt", "size=16"]
    assert "--method" in run and run[run.index("--method") + 1] == "all"
    assert report[report.index("--results") + 1] == str(tmp_path / "runs")
    for cmd, folder in ((tables, "tables"), (figures, "figures")):
        assert cmd[cmd.index("--results") + 1] == str(tmp_path / "runs")
        assert cmd[cmd.index("--out") + 1] == str(tmp_path / folder)
    assert not any("results/runs" in word for c in cmds for word in c)


def test_missing_mini_env_is_a_clear_error(tmp_path):
    ini = tmp_path / "tox.ini"
    ini.write_text("[testenv]\ncommands = pytest\n")
    with pytest.raises(ValueError, match="no \\[testenv:mini\\] commands"):
        mini_commands(ini, tmp_path, [])


def test_per_method_sums_timing_rows_and_takes_the_last_tasks_accuracy():
    rows = []
    for method, accs in (("finetune", [[1.0], [0.9, 0.95]]), ("nws", [[0.8], [0.7, 1.0]])):
        for t in range(2):
            rows += [{"method": method, "task": t, "after_task": t, "metric": m, "value": v}
                     for m, v in (("train_seconds", 2.0 + t), ("task_seconds", 3.0 + t))]
            rows += [{"method": method, "task": j, "after_task": t, "metric": "accuracy",
                      "value": a} for j, a in enumerate(accs[t])]
    got = per_method(pd.DataFrame(rows))
    assert got.loc["finetune", "train_s"] == 5.0 and got.loc["nws", "task_s"] == 7.0
    assert got.loc["finetune", "min_accuracy"] == 0.9  # after the last task, not task 0's 1.0
    assert got.loc["nws", "min_accuracy"] == 0.7 and got.loc["nws", "tasks"] == 2
    assert abs(got.loc["nws", "mean_accuracy"] - 0.85) < 1e-12


@pytest.mark.parametrize("case", ["work_is_file", "runs_is_file", "cache_not_empty",
                                  "json_in_missing_folder", "json_is_folder", "no_mini_env",
                                  "budget_nan", "accuracy_in_percent"])
def test_bad_inputs_exit_2_with_a_message_before_running(tmp_path, monkeypatch, capsys, case):
    import benchmarks.perf.mini_timing as mt

    monkeypatch.setattr(mt.subprocess, "run", lambda *a, **k: pytest.fail("ran a command"))
    argv = ["--work", str(tmp_path / "w")]
    if case == "work_is_file":
        (tmp_path / "w").write_text("x")
    elif case == "runs_is_file":
        (tmp_path / "w").mkdir()
        (tmp_path / "w" / "runs").write_text("x")
    elif case == "cache_not_empty":
        (tmp_path / "w" / "cache").mkdir(parents=True)
        (tmp_path / "w" / "cache" / "old").write_text("x")
    elif case == "json_in_missing_folder":
        argv += ["--json", str(tmp_path / "nope" / "t.json")]
    elif case == "json_is_folder":
        argv += ["--json", str(tmp_path)]
    elif case == "budget_nan":
        argv += ["--budget", "nan"]
    elif case == "accuracy_in_percent":
        argv += ["--min-accuracy", "90"]
    else:
        (tmp_path / "tox.ini").write_text("[testenv]\ncommands = pytest\n")
        monkeypatch.setattr(mt, "ROOT", tmp_path)
    with pytest.raises(SystemExit) as exc:
        mt.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_run_that_wrote_no_rows_fails_clearly(tmp_path, monkeypatch, capsys):
    import benchmarks.perf.mini_timing as mt

    monkeypatch.setattr(mt, "mini_commands", lambda *a: [[sys.executable, "-m", "this"]])
    assert mt.main(["--work", str(tmp_path / "w"), "--warm-kernels"]) == 1
    assert "FAILED: the run command wrote no rows" in capsys.readouterr().err
