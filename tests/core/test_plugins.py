"""Plugins (issue 24; docs/architecture.md, "Plugins: specs, entry points, identity"): a
method by module path and by entry point beside the built-ins, its rows and run folder under
its class's name, analysis finding its class from the run's spec, the ``plugin`` identity key
and a refused resume after an upgrade; broken entry points left out, named, once; name clashes
refused naming both; prefixes."""

from __future__ import annotations

import json
import logging

import pytest

from analysis.identity import method_class
from analysis.runs import load_runs, method_hook, pool_size
from benchmarks.core.registry import PluginError, Registry, UnknownNameError
from benchmarks.exec import run as cli
from benchmarks.exec import status
from benchmarks.methods.table import METHODS
from tests.fake_plugins import (
    TINY,
    fresh_registries,
    method_site,
    set_version,
    write_distribution,
    write_method_module,
)

MOD = "p24plug_methods"
EP_MOD = "p24plug_ep"
DIST = "p24plug-fake-dist"


@pytest.fixture(autouse=True)
def _fresh():
    yield from fresh_registries("p24plug_")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site folder on sys.path with the plugin module :data:`MOD`."""
    return method_site(tmp_path, monkeypatch, MOD)


@pytest.fixture
def installed(site):
    """Distribution :data:`DIST` 1.0 in ``site``: entry point ``tiny-ep`` (a method), and
    three that cannot be: a missing module, a built-in's name, a name not its class's."""
    write_method_module(site, EP_MOD, name="tiny-ep")
    return write_distribution(site, DIST, "1.0", [EP_MOD], {"nws_bench.methods": [
        f"tiny-ep = {EP_MOD}:TinyFT",
        "broken-ep = p24plug_nowhere:Method",
        f"finetune = {EP_MOD}:TinyFT",
        f"misnamed-ep = {MOD}:TinyFT",
    ]})


def _config(run_dir):
    return json.loads((run_dir / "config.json").read_text())


def test_a_module_path_method_runs_beside_a_builtin_under_its_class_name(site, tmp_path,
                                                                         capsys):
    out = tmp_path / "out"
    spec = f"{MOD}:TinyFT"
    plan = ["--method", f"finetune,{spec}", *TINY, "--out", str(out)]
    assert cli.main(plan) == 0
    folders = sorted(p.parent for p in out.glob("*/config.json"))
    assert [f.name[:-9] for f in folders] == ["synthetic-finetune-resnet18-smoke-s1993",
                                              "synthetic-tiny-ft-resnet18-smoke-s1993"]
    plugin_dir = folders[1]
    config = _config(plugin_dir)
    assert config["run_config"]["method"] == spec  # the job's spec, as given
    assert config["identity"]["method"] == "tiny-ft"
    assert config["identity"]["plugin"] == {"class": spec, "distribution": None,
                                            "version": None}
    assert "plugin" not in _config(folders[0])["identity"]
    # status finds both runs from the same flags (matched by the run configuration)
    assert status.main([*plan]) == 0
    assert "done" in capsys.readouterr().out
    # analysis: rows under the class's name; its class found from config.json's spec
    runs = {r.registered_method: r for r in load_runs(out)}
    assert set(runs) == {"finetune", "tiny-ft"}
    assert runs["tiny-ft"].method == "tiny-ft (size=16, tasks=1)"  # its label in tables
    assert runs["tiny-ft"].method_spec == spec
    assert method_class(spec)[0].name == "tiny-ft"
    method_hook.cache_clear()
    assert pool_size(runs["tiny-ft"]) == 7  # TinyFT's declared hook, not the fallback 512


def test_a_builtin_given_by_its_module_path_is_the_builtin(site):
    spec = "benchmarks.methods.nws_method:NWSMethod"
    assert METHODS.get(spec) is METHODS.get("nws")
    assert METHODS.provenance(METHODS.get(spec)) is None  # no plugin key: the same run
    assert METHODS.split(f"nws, {spec}") == ["nws"]  # one run, planned once
    assert METHODS.split("all") == ["finetune", "nws", "ksm", "packnet", "aqd"]  # the paper's
    assert METHODS.split(f"all,{MOD}:TinyFT")[-1] == f"{MOD}:TinyFT"


@pytest.mark.parametrize("attr, says", [
    ("Clash", f"method '{MOD}:Clash' ({MOD}:Clash) is named 'nws' like the built-in method nws "
              "(benchmarks.methods.nws_method:NWSMethod)"),
    ("NOT_A_METHOD", "an object of type int is not a subclass of "
                     "benchmarks.methods.contract.Method"),
    ("Plain", f"class {MOD}:Plain is not a subclass of benchmarks.methods.contract.Method"),
    ("Nameless", "has no usable `name` (got None)"),
    ("Abstract", "does not implement load_task, memory_formula, model_for_task, save_task"),
    ("Nope", f"module {MOD} has no attribute 'Nope'"),
])
def test_a_spec_of_the_wrong_kind_is_refused_naming_it(site, attr, says):
    with pytest.raises(PluginError) as err:
        METHODS.get(f"{MOD}:{attr}")
    assert f"method '{MOD}:{attr}'" in str(err.value) and says in str(err.value)


def test_two_plugins_of_one_name_are_refused_naming_both(site):
    write_method_module(site, MOD + "_other")  # another TinyFT, also named tiny-ft
    METHODS.get(f"{MOD}:TinyFT")
    with pytest.raises(PluginError) as err:
        METHODS.get(f"{MOD}_other:TinyFT")
    assert (f"method '{MOD}_other:TinyFT' ({MOD}_other:TinyFT) is named 'tiny-ft' like the "
            f"plugin {MOD}:TinyFT ({MOD}:TinyFT)") in str(err.value)


def test_entry_points_add_names_and_broken_ones_are_left_out_once(installed, caplog):
    caplog.set_level(logging.WARNING, logger="benchmarks")
    assert METHODS.get("finetune").__module__ == "baselines.finetune"  # built-ins unbroken
    tiny = METHODS.get("tiny-ep")
    assert tiny.name == "tiny-ep" and tiny.__module__ == EP_MOD
    assert "tiny-ep" in METHODS and "tiny-ep" not in METHODS.names()  # not in --method all
    broken = METHODS.broken()
    assert set(broken) >= {"broken-ep", "finetune", "misnamed-ep"}
    assert "broken-ep = p24plug_nowhere:Method (distribution p24plug-fake-dist 1.0): " \
           "ModuleNotFoundError: No module named 'p24plug_nowhere'" in broken["broken-ep"]
    assert "like the built-in method finetune (baselines.finetune:Finetune)" in broken["finetune"]
    assert "its method is named 'tiny-ft'; name the entry point 'tiny-ft'" in \
        broken["misnamed-ep"]
    with pytest.raises(PluginError, match="No module named 'p24plug_nowhere'"):
        METHODS.get("broken-ep")
    METHODS.get("tiny-ep")
    warned = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert sum("'broken-ep'" in w for w in warned) == 1  # once, however often looked up
    listing = cli.list_registries()
    assert f"[plugin {EP_MOD}:TinyFT, {DIST} 1.0]" in listing
    assert "left out: entry point broken-ep: broken-ep = p24plug_nowhere:Method" in listing


def test_the_plugin_key_names_the_distribution_and_an_upgrade_is_not_resumed(
        installed, tmp_path, capsys):
    out = tmp_path / "out"
    plan = ["--method", "tiny-ep", *TINY, "--out", str(out)]
    assert cli.main(plan) == 0
    (run_dir,) = [p.parent for p in out.glob("*/config.json")]
    assert _config(run_dir)["identity"]["plugin"] == {
        "class": f"{EP_MOD}:TinyFT", "distribution": DIST, "version": "1.0"}
    # the module path of the same class is the same run (found done, nothing written)
    assert cli.main(["--method", f"{EP_MOD}:TinyFT", *TINY, "--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    set_version(installed, "1.1")
    METHODS.forget_plugins()  # a new process would read the new version
    assert cli.main(plan) == 2
    err = capsys.readouterr().err
    assert str(run_dir) in err and "its version '1.0' -> '1.1'" in err
    assert "Traceback" not in err


def test_a_plugin_moved_to_another_class_path_is_not_resumed(site, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["--method", f"{MOD}:TinyFT", *TINY, "--out", str(out)]) == 0
    write_method_module(site, MOD + "_moved")  # the same name, tiny-ft: the same run folder
    METHODS.forget_plugins()  # as a new process
    assert cli.main(["--method", f"{MOD}_moved:TinyFT", *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"its class '{MOD}:TinyFT' -> '{MOD}_moved:TinyFT'" in err, err


def test_a_job_carries_the_spec(site, tmp_path):
    from benchmarks.exec.launch import plan_jobs

    args = cli.parser().parse_args(["--method", f"finetune,{MOD}:TinyFT", *TINY, "--out",
                                    str(tmp_path), "--launcher", "slurm"])
    jobs = plan_jobs(args)
    assert [j.config["method"] for j in jobs] == ["finetune", f"{MOD}:TinyFT"]
    assert [j.argv()[:2] for j in jobs] == [["--method", "finetune"],
                                            ["--method", f"{MOD}:TinyFT"]]
    assert [j.method for j in jobs] == ["finetune", "tiny-ft"]  # named as its run folder


def test_an_installed_module_path_plugin_names_its_distribution(site):
    write_distribution(site, "p24plug-mod-dist", "2.5", [MOD], {})  # no entry point
    assert METHODS.provenance(METHODS.get(f"{MOD}:TinyFT")) == {
        "class": f"{MOD}:TinyFT", "distribution": "p24plug-mod-dist", "version": "2.5"}


def test_unknown_names_say_what_a_spec_is():
    with pytest.raises(UnknownNameError) as err:
        METHODS.get("mypkg.methods.MyMethod")
    text = str(err.value)
    assert "a module path takes a colon" in text and "valid methods: finetune, nws" in text


def test_a_prefix_is_tried_before_the_module_path_rule():
    made = []
    reg: Registry[str] = Registry("thing", group="p24plug.none")
    reg.add_prefix("json", lambda rest: made.append(rest) or f"made {rest}", "things by name")
    assert reg.get("json:dumps") == "made dumps"  # never json.dumps
    assert made == ["dumps"]
    assert reg.get("json:loads") == "made loads"
    assert "json:NAME" in reg.describe() and "things by name" in reg.describe()
    with pytest.raises(ValueError, match="declared twice"):
        reg.add_prefix("json", str, "again")
    assert callable(reg.get("textwrap:dedent"))  # other modules: the module-path rule
    plain: Registry[str] = Registry("logger")  # no entry-point group: names only
    with pytest.raises(UnknownNameError, match="unknown logger 'textwrap:dedent'"):
        plain.get("textwrap:dedent")


def test_a_plugin_calling_sys_exit_at_import_is_refused_not_obeyed(site):
    """A module whose import calls ``sys.exit`` used to end the command with its code and
    no word; given by module path it is a PluginError naming the spec, as an entry point it
    is left out and the built-ins keep working."""
    (site / "p24plug_exits.py").write_text("import sys\nsys.exit(3)\n")
    write_distribution(site, "p24plug-exit-dist", "0.1", ["p24plug_exits"],
                       {"nws_bench.methods": ["exiter = p24plug_exits:X"]})
    assert METHODS.get("finetune").name == "finetune"
    assert "SystemExit: 3" in METHODS.broken()["exiter"]
    with pytest.raises(PluginError, match=r"'p24plug_exits:X'.*raised SystemExit: 3"):
        METHODS.get("p24plug_exits:X")


def test_every_spelling_of_one_method_plans_one_run_under_one_spelling(site):
    """A re-export (``pkg:Class`` of ``pkg.impl:Class``), a built-in's module path and its
    name are planned under one spelling, so status asked with another spelling finds the
    sweep's job records and folders."""
    (site / "p24plug_reexport.py").write_text(f"from {MOD} import TinyFT\n")
    assert METHODS.split(f"p24plug_reexport:TinyFT,{MOD}:TinyFT") == [f"{MOD}:TinyFT"]
    assert METHODS.split("benchmarks.methods.nws_method:NWSMethod") == ["nws"]
    jobs = [plan for spelling in ("p24plug_reexport:TinyFT", f"{MOD}:TinyFT")
            for plan in _plan(spelling)]
    assert jobs[0].key == jobs[1].key and jobs[0].match == jobs[1].match


def _plan(method: str):
    from benchmarks.exec.launch import plan_jobs

    return plan_jobs(cli.parser().parse_args(["--method", method, *TINY, "--out", "runs",
                                              "--launcher", "local"]))


@pytest.mark.parametrize("text", ["nws, ,finetune", ",", ""])
def test_an_empty_item_of_a_method_list_is_named(text):
    with pytest.raises(PluginError, match="has an empty item"):
        METHODS.split(text)
