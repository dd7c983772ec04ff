"""Bad plugin specs stop ``python -m benchmarks.run`` with exit 2 naming the spec and the cause,
before any run folder exists (issue 24, "Bad input"); a job of the local launcher resolves
the spec in its own process (PYTHONPATH), and its rows carry the class's name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.core.results import load_rows
from benchmarks.exec import run as cli
from tests.fake_plugins import (
    TINY,
    fresh_registries,
    method_site,
    raising_module,
    write_distribution,
    write_method_module,
)

REPO = Path(__file__).resolve().parent.parent.parent
MOD = "p24plug_cli"


@pytest.fixture(autouse=True)
def _fresh():
    yield from fresh_registries("p24plug_")


@pytest.fixture
def site(tmp_path, monkeypatch):
    folder = method_site(tmp_path, monkeypatch, MOD)
    raising_module(folder, MOD + "_raises")
    write_distribution(folder, "p24plug-cli-dist", "0.3", [], {"nws_bench.methods": [
        "p24-broken = p24plug_absent:Thing"]})
    return folder


@pytest.mark.parametrize("spec, cause", [
    ("p24plug_absent.sub:Foo", "no module named 'p24plug_absent' (install its package, or put "
                               "the folder holding it on PYTHONPATH)"),
    (f"{MOD}_raises:Foo", f"importing {MOD}_raises raised RuntimeError: plugin import failed "
                          "on purpose"),
    (f"{MOD}:Missing", f"module {MOD} has no attribute 'Missing'"),
    (f"{MOD}:Plain", "not a subclass of benchmarks.methods.contract.Method"),
    (f"{MOD}:Nameless", "has no usable `name`"),
    (f"{MOD}:Abstract", "does not implement"),
    (f"{MOD}:Clash", "like the built-in method nws (benchmarks.methods.nws_method:NWSMethod)"),
    (f"{MOD}:", "a module path is package.module:Attr"),
    ("p24-broken", "p24-broken = p24plug_absent:Thing (distribution p24plug-cli-dist 0.3): "
                   "ModuleNotFoundError"),
])
@pytest.mark.parametrize("launcher", [[], ["--launcher", "local", "--dry-run"]])
def test_a_bad_spec_exits_2_naming_it_before_any_run_folder(site, tmp_path, capsys, spec,
                                                            cause, launcher):
    out = tmp_path / "out"
    code = cli.main(["--method", f"finetune,{spec}", *TINY, "--out", str(out), *launcher])
    err = capsys.readouterr().err
    assert code == 2 and f"method {spec!r}" in err and cause in err, err
    assert "Traceback" not in err
    assert not out.exists()  # nothing planned, nothing run


def test_two_plugins_of_one_name_exit_2_naming_both(site, tmp_path, capsys):
    write_method_module(site, MOD + "_twin")
    out = tmp_path / "out"
    code = cli.main(["--method", f"{MOD}:TinyFT,{MOD}_twin:TinyFT", *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"{MOD}_twin:TinyFT" in err and f"plugin {MOD}:TinyFT" in err
    assert not out.exists()


def test_list_reports_a_broken_entry_point_and_still_lists(site, capsys):
    assert cli.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "  nws " in listed and "left out: entry point p24-broken: p24-broken = " in listed


@pytest.mark.slow
def test_a_local_launcher_job_resolves_the_spec_in_its_own_process(site, tmp_path):
    """The spec travels in the job; its process finds the module through PYTHONPATH."""
    out = tmp_path / "out"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(site)]),
                        "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--method", f"finetune,{MOD}:TinyFT", *TINY,
         "--set", "max_steps_per_epoch=1", "--out", str(out), "--launcher", "local",
         "--jobs", "1", "--threads", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = load_rows(out)
    assert set(rows.method) == {"finetune", "tiny-ft"}
    assert sorted(rows.run_id.unique())[1].startswith("synthetic-tiny-ft-resnet18-smoke-s1993-")


def test_python_m_benchmarks_run_exits_2_on_a_missing_module(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--method", "nws,p24plug_absent:Foo", *TINY,
         "--out", str(out)], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error: method 'p24plug_absent:Foo': no module named 'p24plug_absent'" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
