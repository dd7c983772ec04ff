"""The conformance check (benchmarks.perf.conformance): a built-in passes it; deliberately
broken methods (tests/perf/broken_methods.py) are flagged by the check whose rule they break;
the command's exit codes (0 conforming, 1 violations, 2 bad input)."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest

from baselines.finetune import Finetune
from benchmarks.core.breakdown import Breakdown
from benchmarks.core.checks import Range
from benchmarks.core.protocols import S
from benchmarks.core.store import ArtifactStore
from benchmarks.data import BENCHMARKS
from benchmarks.perf.conformance import (
    assert_conforms,
    check_memory,
    check_method,
    main,
)
from benchmarks.perf.conformance_diff import (
    blob_differences,
    memory_violations,
    rows_differences,
    settings_violations,
)
from tests.perf.broken_methods import (
    FormulaOffByOneTensor,
    ServesFromMemory,
    SyncInAfterStep,
    spec,
)

REPO = Path(__file__).resolve().parent.parent.parent


def _failed(report) -> set[str]:
    return {o.check for o in report.outcomes if not o.passed}


@pytest.fixture(scope="module")
def finetune_check(tmp_path_factory) -> tuple[int, list[str], Path]:
    """``python -m benchmarks.check_method finetune --quick``, its runs kept: (exit status,
    output lines, the uninterrupted run's folder)."""
    out = tmp_path_factory.mktemp("conformance") / "runs"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["finetune", "--quick", "--out", str(out)])
    return code, printed.getvalue().splitlines(), next((out / "whole").iterdir())


@pytest.mark.slow
def test_finetune_conforms_and_the_command_exits_0(finetune_check):
    code, out, _ = finetune_check
    assert code == 0, out
    assert [ln[:8] for ln in out[1:6]] == [f"PASS ({c})" for c in "abcde"], out
    assert "2 of 2 give the logits" in out[1]
    assert "89,497,104 B" in out[2]  # two ResNet-18s with 2-class heads, float32
    assert "identical to an uninterrupted run" in out[3]
    assert "tasks done [0], 1 phase checkpoint(s) left" in out[3]  # killed inside task 1
    assert "task 0 0 syncs" in out[4] and "a later task 0 syncs" in out[4]
    assert out[-1].startswith("verdict: CONFORMING (5 of 5 checks passed; ")


@pytest.mark.slow
def test_a_method_serving_models_from_memory_fails_a(tmp_path):
    """Its store holds no weights and its formula says so: (b) passes, (a) sees the models
    rebuilt in a fresh process give other logits."""
    report = check_method(spec(ServesFromMemory), quick=True, only=["a", "b"],
                          out=tmp_path / "runs")
    assert _failed(report) == {"a"}, report.format()
    a = report.outcomes[0]
    assert "0 of 2 give the logits" in a.figure
    assert [v.split(":")[0] for v in a.violations[:2]] == ["task 0", "task 1"]
    assert all("max |diff|" in v for v in a.violations[:2])
    run_dir = next((tmp_path / "runs" / "whole").iterdir())
    assert not list((run_dir / "artifacts").glob("task_*/*.bin"))  # blank: no weights stored
    assert str(run_dir) in (tmp_path / "runs" / "whole.log").read_text()  # --out keeps logs


@pytest.mark.slow
def test_a_formula_off_by_one_tensor_fails_b(finetune_check):
    """Check (b) on the store of Finetune's run (this method stores exactly what Finetune
    does: only its formula differs)."""
    outcome = check_memory(FormulaOffByOneTensor, finetune_check[2])
    # the head's bias: 2 classes x 4 bytes, in each of the two tasks
    assert outcome.violations == [
        f"task {t} blob 'model': formula 44,748,544 B, stored 44,748,552 B (+8 B)"
        for t in (0, 1)]
    assert check_memory(Finetune, finetune_check[2]).passed


@pytest.mark.slow
def test_rows_and_blob_differences_name_what_differs(finetune_check, tmp_path):
    """What (a) and (c) compare, on a copy of Finetune's run with one accuracy changed and
    one shared blob added."""
    whole = finetune_check[2]
    other = tmp_path / whole.name
    shutil.copytree(whole, other)
    rows = pd.read_csv(other / "rows.csv")
    own = (rows.metric == "accuracy") & (rows.task == 1) & (rows.after_task == 1)
    before = rows.loc[own, "value"].item()
    rows.loc[own, "value"] = before + 0.25
    rows.to_csv(other / "rows.csv", index=False)
    with ArtifactStore(other / "artifacts").transaction() as tx:
        tx.put("extra", b"1234", task=None)
    names = ("a", "b")
    assert rows_differences(whole, whole) == blob_differences(whole, whole) == []
    assert rows_differences(whole, other, names=names) == [
        f"row (1, 1, 'accuracy'): {before:.10g} vs {before + 0.25:.10g}"]
    assert rows_differences(whole, other, "after_task == 0") == []
    assert blob_differences(whole, other, names) == ["shared blob 'extra': only in b"]


def test_item_in_after_step_fails_d_and_the_command_exits_1(capsys):
    assert main([spec(SyncInAfterStep), "--quick", "--only", "d"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("FAIL (d) step cost: task 0 1 syncs")
    assert out[2] == ("  violation (d): task 0: 1 host-sync-prone op(s) per steady-state "
                      "step (aten._local_scalar_dense.default x1)")
    assert out[3].startswith("  violation (d): a later task: 1 host-sync-prone")
    assert out[-1].startswith("verdict: NOT CONFORMING (d failed: 2 violation(s); not run: a, "
                              "b, c, e; ")


def test_assert_conforms_raises_with_the_violations():
    with pytest.raises(AssertionError, match=r"violation \(d\): task 0: 1 host-sync"):
        assert_conforms(spec(SyncInAfterStep), quick=True, only=["d"])
    assert assert_conforms("finetune", only=["e"]).ok


@pytest.mark.parametrize(("argv", "says"), [
    (["no_such_method"], "unknown method 'no_such_method'"),
    (["tests.perf.no_such_module:X"], "tests.perf.no_such_module"),
    (["tests.perf.broken_methods:NoSuchClass"], "NoSuchClass"),
    (["tests.perf.broken_methods:spec"], "tests.perf.broken_methods:spec"),  # a function
    (["finetune", "--arch", "resnet7"], "unknown architecture 'resnet7'"),
    (["finetune", "--benchmark", "mnist"], "unknown benchmark 'mnist'"),
    (["finetune", "--opt", "beta=1"], "unknown option(s) ['beta'] for method finetune"),
    (["nws", "--opt", "pool_size=0"], "--opt pool_size=0: out of range"),
    (["finetune", "--opt", "beta"], "--opt takes KEY=VALUE"),
    (["finetune", "--only", "a,x"], "checks ['x']: valid: a, b, c, d, e"),
])
def test_bad_input_exits_2_naming_it(argv, says, capsys, tmp_path):
    assert main([*argv, "--quick", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_a_used_out_folder_exits_2(tmp_path, capsys):
    (tmp_path / "old").write_text("")
    assert main(["finetune", "--quick", "--out", str(tmp_path)]) == 2
    assert "give an empty or new folder" in capsys.readouterr().err


def test_the_entry_module_exits_2_on_a_bad_spec():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.check_method", "no_such_method"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown method 'no_such_method'" in proc.stderr


def test_memory_violations_name_each_blob_that_differs():
    formula = Breakdown({"pool": 100}, [{"idx": 10}, {"idx": 10, "head": 8}])
    stored = Breakdown({"pool": 100, "extra": 4}, [{"idx": 10}, {"idx": 12}])
    assert memory_violations(formula, formula) == []
    assert memory_violations(formula, stored) == [
        "shared blob 'extra': 4 B stored, not in the formula",
        "task 1 blob 'head': 8 B in the formula, not stored",
        "task 1 blob 'idx': formula 10 B, stored 12 B (+2 B)",
    ]
    assert memory_violations(formula, Breakdown({"pool": 100}, [{"idx": 10}])) == [
        "the formula counts 2 tasks, the store holds 1"]


def test_settings_violations_name_the_option_and_what_it_lacks():
    class Unsourced(Finetune):
        name = "unsourced"
        SETTINGS: ClassVar = {"default": {
            "alpha": S(0.5, "", Range(0, 1, "a fraction")),
            "gamma": S(2, "ours"),
            "delta": S(3, "ours", Range(0, 1, "a fraction")),
        }, "no_such_benchmark": {}}

    class TakesAnything(Finetune):
        name = "takes-anything"

        @classmethod
        def resolve_options(cls, benchmark, overrides):
            return dict(overrides)

    assert settings_violations(Finetune) == []
    assert settings_violations(Unsourced) == [
        "option 'alpha' (default): no source (paper section, reference code, or 'ours')",
        "option 'gamma' (default): declares no range (S(..., check=Range/OneOf/...))",
        "option 'delta' (default): default 3 outside its range: out of range",
        "SETTINGS['no_such_benchmark']: no such benchmark (valid: default, "
        f"{', '.join(BENCHMARKS.names())})",
    ]
    assert [v.split(" on ")[0] for v in settings_violations(TakesAnything)] == [
        "an unknown option (no_such_option_conformance_check) was accepted"] * 4


@pytest.mark.parametrize("flags, says", [
    (["--only", ""], "name at least one check"),
    (["--only", ","], "name at least one check"),
])
def test_an_empty_only_exits_2_rather_than_running_every_check(flags, says, capsys):
    from benchmarks.perf.conformance import main

    assert main(["finetune", "--quick", *flags]) == 2
    assert says in capsys.readouterr().err


def test_an_out_folder_under_a_file_exits_2_naming_it(tmp_path, capsys):
    from benchmarks.perf.conformance import main

    (tmp_path / "afile").write_text("")
    assert main(["finetune", "--quick", "--only", "e", "--out",
                 str(tmp_path / "afile" / "sub")]) == 2
    assert "cannot create that folder" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nws", "ksm", "packnet", "aqd", "linear-probe"])
def test_the_builtins_and_the_example_plugin_conform(method, tmp_path):
    """Issue 24: the five built-ins pass the check in CI (finetune above), and so does the
    example package's method through its entry point (examples/linear_probe, installed by
    tox). Each takes 40-105 s with ``--quick`` on the 2-core dev machine
    (docs/checking-a-method.md)."""
    if method == "linear-probe":
        pytest.importorskip("nws_linear_probe", reason="examples/linear_probe not installed "
                            "(tox installs it: pip install -e examples/linear_probe)")
    report = check_method(method, quick=True, out=tmp_path / "runs")
    assert not _failed(report), report.format()
