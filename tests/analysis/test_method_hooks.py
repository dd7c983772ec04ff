"""Analysis reads a method's store only through the contract's declared hook
(``Method.analysis_hooks``), never by looking up attribute names on the class."""

from __future__ import annotations

import pytest

from analysis.runs import method_hook
from benchmarks.methods.contract import ANALYSIS_HOOKS
from benchmarks.methods.nws_method import NWSMethod
from benchmarks.methods.table import METHODS


def test_nws_declares_its_index_and_pool_size_readers():
    nws = METHODS.get("nws")
    assert nws.__name__ == NWSMethod.__name__
    assert method_hook("nws", "task_indices") == nws.task_indices
    assert method_hook("nws", "pool_size") == nws.pool_size
    assert method_hook("nws", "task_codes") is None


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_declares_only_contract_hooks(name):
    assert set(METHODS.get(name).analysis_hooks()) <= set(ANALYSIS_HOOKS)


def test_a_method_without_hooks_and_an_undeclared_name():
    assert method_hook("finetune", "task_indices") is None
    with pytest.raises(KeyError, match="'task_index' is not an analysis hook"):
        method_hook("nws", "task_index")


def test_a_renamed_function_is_not_found_by_its_old_name(monkeypatch):
    """The hook is what the class declares, not whatever attribute carries the name."""
    nws = METHODS.get("nws")  # the registry's class (another test may have re-imported it)
    monkeypatch.setattr(nws, "analysis_hooks", classmethod(lambda cls: {}))
    method_hook.cache_clear()  # method_hook caches per (method, hook)
    try:
        assert hasattr(nws, "task_indices") and method_hook("nws", "task_indices") is None
    finally:
        method_hook.cache_clear()
