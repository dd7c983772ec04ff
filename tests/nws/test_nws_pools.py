"""Pools: EMA rule, k-means, the authors' checkpoint format, pretraining end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import nws
from benchmarks.models.pretrain import image_folder
from nws.pretrain import PretrainConfig, init_nws_model, pretrain

CPU = torch.device("cpu")


def test_ema_update_matches_hand_computation() -> None:
    lin = nn.Linear(2, 2, bias=False)  # four scalar kernels
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.2], [0.9, 1.1]]))
    model = nws.nwsify(nn.Sequential(lin), pools={"0": torch.tensor([[0.1], [1.0], [5.0]])})
    nws.enable_ema(model)
    nws.ema_update(model, decay=0.5, eps=0.1)
    # assignments: 0.0, 0.2 -> entry 0; 0.9, 1.1 -> entry 1; entry 2 unused
    size = np.array([0.5 * 2, 0.5 * 2, 0.0])  # 0.5 * 0 + 0.5 * counts
    sums = np.array([0.5 * 0.1 + 0.5 * 0.2, 0.5 * 1.0 + 0.5 * 2.0, 0.5 * 5.0 + 0.0])
    total = size.sum()
    smoothed = (size + 0.1) / (total + 3 * 0.1) * total
    expected = sums / smoothed
    torch.testing.assert_close(model[0].pool[:, 0], torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(model[0].ema_size, torch.tensor(size, dtype=torch.float32))


def test_kmeans_recovers_separated_clusters_deterministically() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres])
    a = nws.kmeans(points, 3, iters=10, generator=torch.Generator().manual_seed(1))
    b = nws.kmeans(points, 3, iters=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    got = a[torch.argsort(a[:, 0] * 100 + a[:, 1])]
    want = centres[torch.argsort(centres[:, 0] * 100 + centres[:, 1])]
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)


def test_kmeans_with_fewer_points_than_entries_keeps_every_point() -> None:
    points = torch.tensor([[1.0], [2.0], [2.0]])
    pool = nws.kmeans(points, 5, generator=torch.Generator().manual_seed(0))
    assert pool.shape == (5, 1)
    assert {1.0, 2.0} <= set(pool[:, 0].tolist())


def test_import_authors_checkpoint(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1),
                          nn.Flatten(), nn.Linear(8, 3))
    embeds = {"conv_a": torch.randn(9, 512), "conv_b": torch.randn(1, 512),
              "head": torch.randn(1, 512)}
    weights = {"conv_a": torch.randn(4, 3, 3, 3), "conv_b": torch.randn(2, 4, 1, 1),
               "head": torch.randn(3, 8, 1, 1)}
    sd = {f"module.{k}.qtz.embed": v for k, v in embeds.items()}
    sd |= {f"module.{k}.weight": v for k, v in weights.items()}
    bn = {"weight": torch.rand(4), "bias": torch.randn(4), "running_mean": torch.arange(4.0),
          "running_var": torch.rand(4) + 0.5, "num_batches_tracked": torch.tensor(7)}
    sd |= {f"module.bn_a.{k}": v for k, v in bn.items()}  # their name: paired by order
    torch.save({"model": sd, "epoch": 160}, tmp_path / "KP_resume.pt")
    pf = nws.import_authors_pools(tmp_path / "KP_resume.pt", model)
    assert list(pf.pools) == ["0", "2", "4"]  # matched in module order
    torch.testing.assert_close(pf.pools["0"], embeds["conv_a"].t())
    assert pf.pools["4"].shape == (512, 1)
    torch.testing.assert_close(pf.weights["4"], weights["head"].reshape(3, 8))
    for k, v in bn.items():
        assert torch.equal(pf.state[f"1.{k}"], v)
    nws.nwsify(model, pools=pf.pools)  # the imported pools fit the model
    bad = {k: v for k, v in sd.items() if "conv_a.qtz" not in k} | {
        "module.conv_a.qtz.embed": torch.randn(4, 512)}
    torch.save({"model": bad}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"qtz\.embed"):
        nws.import_authors_pools(tmp_path / "bad.pt", nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(8, 3)))


def _tiny_image_folder(root) -> None:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            arr[..., 0] = 250 if c == "a" else 5
            Image.fromarray(arr).save(root / c / f"{i}.png")


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def test_pretrain_ema_learns_pools_and_resumes_exactly(tmp_path) -> None:
    _tiny_image_folder(tmp_path / "data")
    hidden = tmp_path / "data" / ".ipynb_checkpoints"  # never a class (the listing rule)
    hidden.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(hidden / "x.png")
    (tmp_path / "data" / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    data = image_folder(tmp_path / "data", 16)
    assert data.classes == ["a", "b"] and len(data) == 12
    cfg = PretrainConfig(epochs=2, milestones=(1,), batch_size=4, pool_size=16, workers=0,
                         lr=0.05)
    straight = pretrain(init_nws_model(_tiny_model(), cfg), data, cfg, tmp_path / "a", CPU)
    first = PretrainConfig(**{**cfg.__dict__, "epochs": 1})
    pretrain(init_nws_model(_tiny_model(), first), data, first, tmp_path / "b", CPU)
    resumed = pretrain(init_nws_model(_tiny_model(), cfg), data, cfg, tmp_path / "b", CPU)
    a, b = nws.load_pools(straight), nws.load_pools(resumed)
    init = nws.get_pools(init_nws_model(_tiny_model(), cfg))
    for name in init:
        assert torch.equal(a.pools[name], b.pools[name])
        assert not torch.equal(a.pools[name], init[name])  # the pools did learn
    assert set(a.weights) == set(init) and "1.running_mean" in a.state


def test_pretrain_gradient_rule_moves_only_selected_entries(tmp_path) -> None:
    _tiny_image_folder(tmp_path / "data")
    cfg = PretrainConfig(epochs=1, batch_size=12, pool_size=64, rule="gradient", workers=0,
                         momentum=0.0, weight_decay=0.0, max_steps=1)
    model = init_nws_model(_tiny_model(), cfg)
    before = nws.get_pools(model)
    used = {n: torch.unique(m.indices()) for n, m in nws.nws_layers(model).items()}
    out = pretrain(model, image_folder(tmp_path / "data", 16), cfg, tmp_path / "g", CPU)
    after = nws.load_pools(out).pools
    for name, idx in used.items():
        moved = (after[name] != before[name]).any(1)
        assert moved.any() and not moved[~torch.isin(torch.arange(64), idx)].any()
