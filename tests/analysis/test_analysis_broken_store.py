"""A run whose artifact store lost a blob (or whose delta chain is broken) is left out of the
analyses that read the store, with a warning naming it: never a traceback (was: figures and
the bits table crashed on the method's error)."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

import analysis.runs
from analysis import figures, tables
from benchmarks.methods.nws_method import BrokenChainError
from tests.analysis.test_analysis_outputs import LAYERS, _fake_hook, _results


def _flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {"lost": lambda p: p.unlink(), "flipped": _flip_a_byte,
          "truncated": lambda p: p.write_bytes(p.read_bytes()[:-1])}


def _damage_a_blob(results, kind: str = "lost") -> str:
    """Damage task 1's first blob file of seed 1993's NWS run (``kind`` of :data:`DAMAGE`);
    returns the run folder name."""
    run = next(results.glob("*-nws-*-s1993-*"))
    index = json.loads((run / "artifacts" / "index.json").read_text())
    DAMAGE[kind](run / "artifacts" / next(iter(index["task_001"].values()))["file"])
    return run.name


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_blob_leaves_the_run_out_with_a_warning(tmp_path, monkeypatch, caplog, kind):
    """Lost, or (checksum, size in the index) a flipped byte or a truncation."""
    monkeypatch.setattr(analysis.runs, "method_hook", _fake_hook)
    results = _results(tmp_path / "runs", "split_digits")
    broken = _damage_a_blob(results, kind)
    with caplog.at_level(logging.WARNING, logger="analysis.runs"):
        files, _ = figures.build_figures(results, tmp_path / "figures", "split_digits")
        assert tables.main(["--results", str(results), "--benchmark", "split_digits",
                            "--out", str(tmp_path / "tables")]) == 0
    assert broken in caplog.text and "left out" in caplog.text
    kernels = pd.read_csv(tmp_path / "figures" / "fig4_split_digits_paper.csv")
    assert set(kernels.seed) == {1994}  # the intact run only
    assert len(kernels) == 2 * len(LAYERS)
    assert any(p.name == "fig4_split_digits_paper.png" for p in files)


def test_a_broken_chain_is_left_out_too(tmp_path, monkeypatch, caplog):
    def hook(method: str, name: str):
        if name != "task_indices":
            return _fake_hook(method, name)

        def read(store, t):
            raise BrokenChainError(f"artifact store {store.root}: task {t}'s base is missing")
        return read

    monkeypatch.setattr(analysis.runs, "method_hook", hook)
    results = _results(tmp_path / "runs", "split_digits")
    with caplog.at_level(logging.WARNING, logger="analysis.runs"):
        _, messages = figures.build_figures(results, tmp_path / "figures", "split_digits")
    assert "base is missing" in caplog.text
    assert any("no NWS run with a readable artifact store" in m for m in messages)
