"""The GPU path of NWS on CPU: the full search exact against float64 brute force, no host
sync in a steady-state training step (op counter), IEEE float32 forced whatever TF32 API
the user set, and the layer's cached search never stale (issue 13, issue 15 item 10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nws
from benchmarks.perf.opcount import OpCounter
from nws.full_search import ScalarPoolSearch, VectorPoolsSearch
from nws.search import ieee_fp32_matmul, search_path
from tests.models.test_archs_speed import _trainer


def brute(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """float64 nearest entry by differences, ties to the lowest index."""
    d = (rows.double()[:, None] - pool.double()[None]).pow(2).sum(-1)
    return d.argmin(1)


def full_index(rows: list[torch.Tensor], pools: list[torch.Tensor]) -> list[torch.Tensor]:
    s = VectorPoolsSearch(pools)
    selected, index = s.search(rows)
    out, start = [], 0
    for r, off, sel, pool in zip(rows, s.offsets, selected, pools, strict=True):
        local = index[start:start + len(r)] - off
        assert torch.equal(sel, pool[local])
        out.append(local)
        start += len(r)
    return out


def test_full_search_equals_float64_brute_force_on_several_layers() -> None:
    g = torch.Generator().manual_seed(0)
    pools = [torch.randn(64, 9, generator=g) * 0.05, torch.randn(32, 9, generator=g),
             torch.randn(512, 9, generator=g) * 0.1]
    rows = [torch.randn(300, 9, generator=g) * 0.05, torch.randn(77, 9, generator=g),
            torch.randn(2000, 9, generator=g) * 0.1]
    for got, r, p in zip(full_index(rows, pools), rows, pools, strict=True):
        assert torch.equal(got, brute(r, p))


def test_full_search_near_ties_and_exact_ties_go_to_the_lowest_index() -> None:
    """Rows a few ulps off the bisector of two entries (float32's expanded distance cannot
    order them: the float64 recheck does), rows exactly on it, and duplicate entries."""
    g = torch.Generator().manual_seed(1)
    pool = torch.randn(256, 9, generator=g)
    pool[200] = pool[17]  # a later exact copy never wins
    pool[5] = pool[3]
    u = torch.randn(9, generator=g)
    u /= u.norm()
    pool[41] = pool[40] + 1e-3 * u  # two entries 1e-3 apart, far from all others
    mid = (pool[40] + pool[41]) / 2
    near = mid + torch.linspace(-3e-6, 3e-6, 81)[:, None] * u  # through their bisector
    exact = torch.stack([torch.zeros(9), torch.ones(9)])
    tie_pool = torch.stack([torch.full((9,), 2.0), torch.zeros(9), torch.full((9,), 2.0)])
    rows = torch.cat([near, pool[17:18], pool[200:201], pool[3:6]])
    got = full_index([rows, exact], [pool, tie_pool])
    assert torch.equal(got[0], brute(rows, pool))
    assert got[0][-5:-3].tolist() == [17, 17] and got[0][-3:].tolist() == [3, 4, 3]
    # (1,..,1) is equally far from entries 0 and 1 and from 2 (== 0): lowest index
    assert torch.equal(got[1], brute(exact, tie_pool)) and got[1].tolist() == [1, 0]
    # 0 is equally far from all 18 entries +-e_i, far more than the 4 rechecked candidates
    eye = torch.eye(9)
    axes = torch.cat([torch.randn(100, 9, generator=g) * 3 + 10, eye, -eye, eye * 2])
    zero = torch.zeros(3, 9)
    assert full_index([zero], [axes])[0].tolist() == [100] * 3 == brute(zero, axes).tolist()
    assert set(got[0][: len(near)].tolist()) == {40, 41}  # the walk crosses the bisector
    # float32's expanded distance alone cannot order these rows: the float64 recheck does
    expanded = torch.addmm(pool.pow(2).sum(1), near, pool.t(), alpha=-2).argmin(1)
    assert (expanded != brute(near, pool)).sum() > 0


def test_full_search_chunks_rows(monkeypatch) -> None:
    monkeypatch.setattr("nws.full_search.CHUNK_ELEMENTS", 64 * 100)  # 100-row chunks
    g = torch.Generator().manual_seed(2)
    pool, rows = torch.randn(64, 4, generator=g), torch.randn(1234, 4, generator=g)
    assert torch.equal(full_index([rows], [pool])[0], brute(rows, pool))


def test_scalar_full_search_exact_on_midpoints_duplicates_and_extremes() -> None:
    pool = torch.tensor([0.5, -1.0, 0.25, 0.5, 2.0, -1.0, 1e-8])[:, None]
    s = ScalarPoolSearch(pool)
    uniq = torch.tensor([-1.0, 1e-8, 0.25, 0.5, 2.0])
    mids = ((uniq[:-1].double() + uniq[1:].double()) / 2).float()
    x = torch.cat([mids, torch.nextafter(mids, torch.full_like(mids, 9)),
                   torch.nextafter(mids, torch.full_like(mids, -9)),
                   torch.tensor([-1e9, 1e9, 0.0, 0.375, 1.25, -0.5, 0.5]),
                   torch.randn(5000) * 2])
    values, rank = s.search(x)
    expect = brute(x[:, None], pool)
    assert torch.equal(s.index(rank), expect)
    assert torch.equal(values[:, 0], pool[expect, 0])
    ends = s.search(torch.tensor([float("inf"), -float("inf")]))[1]
    assert s.index(ends).tolist() == [4, 1]  # the largest value, the lowest index of -1
    single = ScalarPoolSearch(torch.full((4, 1), 0.3))
    assert single.index(single.search(torch.randn(10))[1]).eq(0).all()


@pytest.mark.parametrize("mode", ["none", "legacy", "precision", "new", "backends"])
def test_search_forces_ieee_and_restores_the_users_tf32_flags(mode: str) -> None:
    """Whichever API set TF32, the search sets IEEE inside and reads back the user's flags
    after, without reading the legacy flag where it raises."""
    m = torch.backends.cuda.matmul
    names = ("fp32_precision",) if hasattr(m, "fp32_precision") else ("allow_tf32",)
    saved = (m.fp32_precision if hasattr(m, "fp32_precision") else m.allow_tf32,
             getattr(torch.backends, "fp32_precision", None),
             torch.backends.mkldnn.matmul.fp32_precision
             if hasattr(torch.backends.mkldnn, "matmul") else None)
    try:
        if mode == "legacy":
            m.allow_tf32 = True
        elif mode == "precision":
            torch.set_float32_matmul_precision("high")
        elif mode == "new" and hasattr(m, "fp32_precision"):
            m.fp32_precision = "tf32"
        elif mode == "backends" and hasattr(torch.backends, "fp32_precision"):
            torch.backends.fp32_precision = "tf32"
        before = {n: getattr(m, n) for n in names}
        with ieee_fp32_matmul():
            inside = {n: getattr(m, n) for n in names}
            layer = nws.NWSConv2d(nn.Conv2d(2, 3, 3), torch.randn(8, 9), search="full")
            assert torch.equal(layer.search(), brute(layer.rows().detach(), layer.pool))
        assert inside == ({"fp32_precision": "ieee"} if "fp32_precision" in names
                          else {"allow_tf32": False})
        assert {n: getattr(m, n) for n in names} == before
        layer.search()  # the search's own context: flags restored again, nothing raises
        assert {n: getattr(m, n) for n in names} == before
    finally:
        if hasattr(torch.backends, "fp32_precision"):
            torch.backends.fp32_precision = saved[1]
        if hasattr(m, "fp32_precision"):
            m.fp32_precision = saved[0]
        else:
            m.allow_tf32 = saved[0]
        if saved[2] is not None:
            torch.backends.mkldnn.matmul.fp32_precision = saved[2]


def test_search_path_names(monkeypatch) -> None:
    monkeypatch.delenv("NWS_SEARCH", raising=False)
    assert search_path(torch.device("cpu")) == "certificates"
    assert search_path(torch.device("meta")) == "full"
    monkeypatch.setenv("NWS_SEARCH", "full")
    assert search_path(torch.device("cpu")) == "full"
    assert search_path(torch.device("cpu"), "certificates") == "certificates"
    monkeypatch.setenv("NWS_SEARCH", "fast")
    with pytest.raises(ValueError, match="valid: full, certificates"):
        search_path(torch.device("cpu"))


def _plain_small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, bias=False), nn.Conv2d(64, 64, 3, bias=False),
                         nn.Conv2d(64, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def _small_model(search: str) -> nn.Module:
    return nws.nwsify(_plain_small(), pool_size=64, search=search)


def _fresh(layer: nws.NWSLayer) -> torch.Tensor:
    return brute(layer.rows().detach(), layer.pool)


# Every way user code changes W or the pool; each must be seen by the cached search.
CHANGES = {
    "data": lambda layer, new: layer.weight.data.copy_(new),
    "no_grad": lambda layer, new: _no_grad(lambda: layer.weight.mul_(0).add_(new)),
    "load_state_dict": lambda layer, new: layer.load_state_dict(
        {**layer.state_dict(), "weight": new}),
    "copy_": lambda layer, new: _no_grad(lambda: layer.weight.copy_(new)),
    "pool.data": lambda layer, new: layer.pool.data.mul_(-1),
}


def _no_grad(fn) -> None:
    with torch.no_grad():
        fn()


@pytest.mark.parametrize("search", ["full", "certificates"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_cached_search_is_never_stale(search: str, change: str) -> None:
    """Issue 15 item 10: after a forward (the search cached), W or the pool changed behind
    the layer's back: indices, K and the next forward follow the change."""
    model = _small_model(search)
    x = torch.randn(2, 3, 8, 8)
    model(x)
    layers = list(nws.nws_layers(model).values())
    for layer in layers:
        before = layer.indices()
        new = torch.randn_like(layer.weight) * layer.weight.std() * 3
        CHANGES[change](layer, new)
        fresh = _fresh(layer)
        assert not torch.equal(before, fresh)  # the change moved the selection
        assert torch.equal(layer.search(), fresh)
        assert torch.equal(layer.indices(), fresh)
        assert torch.equal(layer.selected().reshape(-1, layer.dim), layer.pool[fresh])
    out = model(x)  # the next forward runs with the fresh K
    plain = nws.to_plain(model)
    torch.testing.assert_close(out, plain(x))


def test_certificates_and_full_paths_agree_in_training() -> None:
    """A few SGD steps on the same model through both paths: identical indices."""
    runs = {}
    for search in ("full", "certificates"):
        model = _small_model(search)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            opt.zero_grad()
            (model(x).pow(2).mean() + nws.similarity_loss(model, 0.5)).backward()
            opt.step()
        runs[search] = nws.encode(model)
        for layer in nws.nws_layers(model).values():
            assert torch.equal(layer.indices(), _fresh(layer))
    for name, index in runs["full"].items():
        assert torch.equal(index, runs["certificates"][name])


def _count_step(method: str, phase: str, tmp_path) -> OpCounter:
    """Ops of one steady-state step (2 warm-up steps) of the suite's ResNet-18 trainer,
    batch 32, 32x32, foreach SGD (torch's default on CUDA)."""
    trainer = _trainer(method, "resnet18", phase, tmp_path)
    trainer.opt = torch.optim.SGD(trainer.method.parameters(trainer.model), lr=0.01,
                                  momentum=0.9, weight_decay=1e-5, foreach=True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 5, (32,), generator=g)
    for _ in range(2):
        trainer.step(x, y)
    with OpCounter() as ops:
        trainer.step(x, y)
    return ops


@pytest.mark.slow
def test_nws_step_on_the_full_path_is_sync_free_and_within_2x_plain_ops(
        monkeypatch, tmp_path) -> None:
    """Issue 13's targets on the CUDA code path, counted on CPU: 0 sync-prone ops per
    steady-state NWS step (first and later tasks), ops <= 2x the plain step's."""
    monkeypatch.setenv("NWS_SEARCH", "full")
    plain = _count_step("finetune", "first-task", tmp_path / "plain")
    assert plain.syncs == 0
    for phase in ("first-task", "later-tasks"):
        ops = _count_step("nws", phase, tmp_path / phase)
        assert ops.syncs == 0, ops.sync_ops
        assert ops.total <= 2 * plain.total, (ops.total, plain.total)
        assert ops.counts["aten.topk.default"] >= 17  # the full search did run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_library_init_and_full_search_sync_free() -> None:
    """On CUDA: k-means and the pretraining init on CUDA inputs, and NWS training steps with
    CUDA's sync debug mode set to error, indices equal to the float64 brute force."""
    from nws.pretrain import PretrainConfig, init_nws_model

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    points = torch.randn(4000, 9, generator=g)
    on_gpu = nws.kmeans(points.to(dev), 64, iters=3, generator=torch.Generator().manual_seed(1))
    on_cpu = nws.kmeans(points, 64, iters=3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-5)
    init = init_nws_model(_plain_small().to(dev), PretrainConfig(pool_size=16))
    assert all(m.pool.is_cuda for m in nws.nws_layers(init).values())
    model = _small_model("full").to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 3, 8, 8, device=dev)
    for step in range(4):
        torch.cuda.set_sync_debug_mode("error" if step >= 2 else 0)
        try:
            loss = model(x).pow(2).mean() + nws.similarity_loss(model, 0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for layer in nws.nws_layers(model).values():
        assert torch.equal(layer.indices().cpu(), _fresh(layer).cpu())


def test_copied_and_pickled_models_search_their_own_weights(tmp_path) -> None:
    import copy

    model = _small_model("full")
    x = torch.randn(2, 3, 8, 8)
    model(x)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer in nws.nws_layers(twin).values():
            layer.weight.mul_(-1)
    torch.save(twin, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for m in (twin, loaded):
        out = m(x)
        for layer in nws.nws_layers(m).values():
            assert torch.equal(layer.last_index(), _fresh(layer))
        torch.testing.assert_close(out, nws.to_plain(m)(x))
    for layer in nws.nws_layers(model).values():  # the original is untouched
        assert torch.equal(layer.last_index(), _fresh(layer))
