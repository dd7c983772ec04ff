"""NWS layers and conversion: straight-through gradients, similarity term, encode/decode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nws
from benchmarks.models import archs


def small_cnn(classes: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise
        nn.Conv2d(8, 4, 1), nn.ReLU(),  # 1x1 with bias: scalar pool
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes),
    )


def test_nwsify_resnet18_counts() -> None:
    """docs/reference.md §2: 21 NWS layers and 1,395,392 indices for a 5-class head."""
    model = nws.nwsify(archs.build("resnet18", 5), pool_size=16)
    layers = nws.nws_layers(model)
    assert len(layers) == 21
    assert sum(m.num_groups for m in layers.values()) == 1_395_392
    assert layers["conv1"].pool.shape == (16, 49)
    assert layers["layer2.0.downsample.0"].pool.shape == (16, 1)
    assert layers["fc"].bias is None and layers["fc"].pool.shape == (16, 1)


def test_straight_through_gradient_equals_plain_gradient_plus_similarity() -> None:
    torch.manual_seed(0)
    model = nws.nwsify(small_cnn(), pool_size=32)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    beta = 0.5
    loss = F.cross_entropy(model(x), y) + nws.similarity_loss(model, beta)
    loss.backward()
    plain = nws.to_plain(copy.deepcopy(model))  # the same net with K as real weights
    F.cross_entropy(plain(x), y).backward()
    for name, layer in nws.nws_layers(model).items():
        k = layer.selected()
        numel = layer.weight.numel()
        expected = plain.get_submodule(name).weight.grad + beta * 2 * (layer.weight - k) / numel
        torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-7)
        assert layer.pool.grad is None


def test_similarity_loss_value() -> None:
    model = nws.nwsify(small_cnn(), pool_size=8)
    per_layer = [((m.weight - m.selected()) ** 2).mean() for m in nws.nws_layers(model).values()]
    torch.testing.assert_close(nws.similarity_loss(model, 0.1), 0.1 * torch.stack(per_layer).sum())


def test_selected_kernels_are_the_brute_force_nearest_entries() -> None:
    model = nws.nwsify(small_cnn(), pool_size=16, group_size=1)
    for layer in nws.nws_layers(model).values():
        rows, pool = layer.rows().detach(), layer.pool
        d = (rows[:, None].double() - pool[None].double()).pow(2).sum(-1)
        assert torch.equal(layer.indices(), d.argmin(1))
        assert torch.equal(layer.selected().reshape(-1, layer.dim), pool[d.argmin(1)])


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_encode_decode_round_trip_and_logits(group_size: int) -> None:
    torch.manual_seed(1)
    base = small_cnn()
    model = nws.nwsify(copy.deepcopy(base), pool_size=32, group_size=group_size)
    assert model[0].dim == 9 * group_size and model[4].dim == group_size
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(6, 3, 8, 8)
    for _ in range(3):  # move W so the indices are not the initial ones
        opt.zero_grad()
        (model(x).pow(2).mean() + nws.similarity_loss(model)).backward()
        opt.step()
    model.eval()
    pools, indices = nws.get_pools(model), nws.encode(model)
    assert [len(v) for v in indices.values()] == [
        m.weight.numel() // m.dim for m in nws.nws_layers(model).values()]
    rebuilt = copy.deepcopy(base)
    rebuilt[-1] = nn.Linear(4, 3, bias=False)  # the NWS head is a 1x1 conv without bias
    rest = {k: v for k, v in model.state_dict().items()
            if (k in rebuilt.state_dict() and k.rpartition(".")[0] not in indices)
            or k.endswith(".bias")}
    rebuilt.load_state_dict(rest, strict=False)
    nws.decode_into(rebuilt, pools, indices)
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
        assert torch.equal(model(x), nws.to_plain(copy.deepcopy(model))(x))


def test_start_from_sets_weights_and_indices() -> None:
    model = nws.nwsify(small_cnn(), pool_size=16)
    layer = model[0]
    idx = torch.randint(0, 16, (layer.num_groups,))
    layer.pool[5] = layer.pool[2]  # duplicate: canonical index is 2
    idx[0] = 5
    layer.start_from(idx)
    expected = idx.clone()
    expected[idx == 5] = 2
    assert torch.equal(layer.indices(), expected)
    assert torch.equal(layer.selected(), layer.weight.detach())


def test_group_size_must_divide_channels() -> None:
    with pytest.raises(ValueError, match="group size"):
        nws.nwsify(nn.Sequential(nn.Conv2d(3, 1, 3)), pool_size=4, group_size=2)
