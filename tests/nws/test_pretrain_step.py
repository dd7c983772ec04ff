"""``nws.pretrain``'s step (issue 25): no host sync per steady-state step on the CUDA code
path (the full search; counted by ``OpCounter`` on CPU), the searchers' pool tables kept and
refreshed in place as the EMA writes the pools (equal to tables built anew), and a
non-finite step skipped on the device."""

from __future__ import annotations

import pytest
import torch

from benchmarks.perf.opcount import OpCounter
from nws.full_search import ScalarPoolSearch, VectorPoolsSearch
from nws.pretrain import PretrainConfig, PretrainStep, init_nws_model, make_optimizer
from tests.nws.test_nws_pools import _tiny_model

CPU = torch.device("cpu")


def _step(monkeypatch, **cfg) -> tuple[PretrainStep, torch.nn.Module]:
    monkeypatch.setenv("NWS_SEARCH", "full")  # the GPU path, counted on CPU
    config = PretrainConfig(pool_size=16, amp="none", **cfg)
    model = init_nws_model(_tiny_model(), config)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return PretrainStep(model, model, make_optimizer(model, config), scaler, config, CPU), model


def test_a_steady_state_step_is_sync_free_and_keeps_its_pool_tables(monkeypatch):
    step, _ = _step(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)
    for _ in range(2):
        step(x, y)
    group = step.layers[0].search_group
    searchers = [s for _, s in group._vector.values()] + [s for _, s in group._scalar.values()]
    assert {type(s) for s in searchers} == {VectorPoolsSearch, ScalarPoolSearch}
    storage = [(id(s), s.table.data_ptr() if isinstance(s, VectorPoolsSearch)
                else s.thresholds.data_ptr()) for s in searchers]
    pools_before = [p.clone() for p in step.pools]
    with OpCounter() as ops:
        step(x, y)
    assert ops.syncs == 0, ops.sync_ops
    assert any(not torch.equal(a, b) for a, b in zip(pools_before, step.pools, strict=True))
    step(x, y)  # the forward after the EMA write: searched with the refreshed tables
    now = [s for _, s in group._vector.values()] + [s for _, s in group._scalar.values()]
    assert [(id(s), s.table.data_ptr() if isinstance(s, VectorPoolsSearch)
             else s.thresholds.data_ptr()) for s in now] == storage  # kept, not rebuilt
    for layer in step.layers:  # and each search equals one from tables built anew
        if layer.dim == 1:
            fresh = ScalarPoolSearch(layer.pool)
            expect = fresh.index(fresh.search(layer.weight)[1])
        else:
            fresh = VectorPoolsSearch([layer.pool])
            expect = fresh.search([layer.weight.detach().reshape(-1, layer.dim)])[1]
        assert torch.equal(layer.search(), expect)


def test_a_non_finite_step_is_skipped_on_the_device(monkeypatch):
    step, model = _step(monkeypatch, max_bad_steps=1)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 2, (4,))
    step(x, y)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = torch.full_like(x, float("nan"))
    step(bad, y)
    after = model.state_dict()
    for name in before:  # weights, pools and EMA state; BN's running stats see the batch
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(before[name], after[name]), name
    step.check(2)  # one in a row: allowed
    step(bad, y)
    with pytest.raises(FloatingPointError, match="2 steps in a row by step 3"):
        step.check(3)
    for state in step.opt.state.values():
        assert torch.isfinite(state["momentum_buffer"]).all()
