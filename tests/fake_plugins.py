"""Plugins written for tests: a method module on the path, and an installed distribution with
entry points (a ``*.dist-info`` folder next to its module is all ``importlib.metadata``
needs), for :mod:`benchmarks.core.registry`'s specs."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

from benchmarks.data import BENCHMARKS
from benchmarks.methods.table import METHODS
from benchmarks.models.archs import ARCHS

# The run flags of the plugin tests' tiny runs (one smoke task of the synthetic benchmark).
TINY = ["--benchmark", "synthetic", "--protocol", "smoke", "--tasks", "1", "--bench-opt",
        "size=16", "--deterministic"]

# Finetune under another name (a real method: it trains, stores, and its formula holds), and
# every kind of object a spec may wrongly name.
METHOD_MODULE = '''
"""Test plugin methods."""
from baselines.finetune import Finetune
from benchmarks.methods.contract import Method


class TinyFT(Finetune):
    """Finetune under a plugin's name."""

    name = "{name}"

    @classmethod
    def analysis_hooks(cls):
        return {{"pool_size": 7}}  # seen by analysis only if it finds this class


class Clash(Finetune):
    name = "nws"


class Nameless(Method):
    def model_for_task(self, task, store): ...
    def save_task(self, task, model, tx): ...
    def load_task(self, task, store): ...
    @classmethod
    def memory_formula(cls, arch, num_classes, options): ...


class Abstract(Method):
    name = "abstract-one"


class Plain:
    name = "plain"


NOT_A_METHOD = 3
'''


def write_method_module(folder: Path, module: str, name: str = "tiny-ft") -> Path:
    """``folder/module.py`` holding :data:`METHOD_MODULE` (``TinyFT`` named ``name``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}.py"
    path.write_text(METHOD_MODULE.format(name=name))
    return path


def method_site(tmp_path: Path, monkeypatch, module: str) -> Path:
    """``tmp_path/site``, first on ``sys.path`` for the test, holding method module
    ``module`` (:func:`write_method_module`)."""
    folder = tmp_path / "site"
    write_method_module(folder, module)
    monkeypatch.syspath_prepend(str(folder))
    return folder


def write_distribution(folder: Path, dist: str, version: str, top_level: list[str],
                       entry_points: dict[str, list[str]]) -> Path:
    """An installed distribution ``dist`` in ``folder`` (a site directory): its
    ``dist-info`` with METADATA, top_level.txt and entry_points.txt (group -> lines
    ``name = module:attr``)."""
    info = folder / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "top_level.txt").write_text("".join(f"{t}\n" for t in top_level))
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{line}\n" for line in lines) + "\n"
        for group, lines in entry_points.items()))
    return info


def set_version(info: Path, version: str) -> None:
    """The installed distribution at ``info`` upgraded in place to ``version``."""
    meta = info / "METADATA"
    lines = [f"Version: {version}" if line.startswith("Version:") else line
             for line in meta.read_text().splitlines()]
    meta.write_text("\n".join(lines) + "\n")


def fresh_registries(prefix: str) -> Iterator[None]:
    """Around a test: the registries forget their plugins (before and after), and modules
    named ``prefix*`` are dropped from ``sys.modules`` afterwards."""
    for registry in (METHODS, BENCHMARKS, ARCHS):
        registry.forget_plugins()
    yield
    for registry in (METHODS, BENCHMARKS, ARCHS):
        registry.forget_plugins()
    for name in [m for m in sys.modules if m.startswith(prefix)]:
        del sys.modules[name]


def raising_module(folder: Path, module: str) -> None:
    """``folder/module.py`` whose import raises."""
    (folder / f"{module}.py").write_text(textwrap.dedent('''
        raise RuntimeError("plugin import failed on purpose")
    '''))
