"""Turning any torch model into an NWS model and back: the library's front door.

``nwsify`` replaces every ``nn.Conv2d`` (shortcuts, grouped and depthwise convolutions
included) and the last ``nn.Linear`` (as a 1x1 convolution without bias, paper §4.3) by NWS
layers with layer-wise pools. ``encode`` reads the task model as indices; ``decode_into`` and
``to_plain`` give back plain modules with the selected kernels, which is all inference runs.
"""

from __future__ import annotations

import torch
from torch import nn

from nws.layer import NWSConv2d, NWSLayer, NWSLinear, SearchGroup, similarity_sum
from nws.search import search_path

Pools = dict[str, torch.Tensor]  # layer name -> (n, gs * k * k) pool
Indices = dict[str, torch.Tensor]  # layer name -> (num_groups,) int64


def is_plain_conv(module: nn.Module) -> bool:
    """An ``nn.Conv2d`` that computes what ``nn.Conv2d`` computes (zero padding, the class's
    own forward): what an NWS layer can stand in for. A subclass with its own forward (timm's
    ``Conv2dSame`` pads per input, ``StdConv2d`` standardises its weight) is not."""
    cls = type(module)
    return (isinstance(module, nn.Conv2d) and module.padding_mode == "zeros"
            and cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward)


def convertible_layers(model: nn.Module, linear: str = "last") -> dict[str, nn.Module]:
    """The modules ``nwsify`` converts, by name: every Conv2d and the last ("last"), every
    ("all") or no ("none") Linear, in module order. A Conv2d that is not
    :func:`is_plain_conv` raises ``ValueError`` (converting it would change what it
    computes)."""
    if linear not in ("last", "all", "none"):
        raise ValueError(f"linear must be 'last', 'all' or 'none', got {linear!r}")
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    odd = [f"{n} ({type(m).__name__})" for n, m in mods
           if isinstance(m, nn.Conv2d) and not is_plain_conv(m)]
    if odd:
        raise ValueError(f"NWS replaces convolutions by plain ones, and these compute "
                         f"something else (their own forward or padding mode): "
                         f"{', '.join(odd[:5])}")
    lins = [n for n, m in mods if isinstance(m, nn.Linear)]
    keep = {"all": set(lins), "none": set(), "last": set(lins[-1:])}[linear]
    return {n: m for n, m in mods if isinstance(m, nn.Conv2d) or n in keep}


def group_dim(module: nn.Module, group_size: int = 1) -> int:
    """Length of one pool entry for ``module``: gs * k * k (gs for a Linear)."""
    w = module.weight
    return group_size * (int(w[0, 0].numel()) if w.ndim > 2 else 1)


def kernel_rows(module: nn.Module, group_size: int = 1) -> torch.Tensor:
    """A module's weight as (groups, dim) rows, the order NWS indexes them in."""
    return module.weight.detach().reshape(-1, group_dim(module, group_size))


def random_pools(model: nn.Module, pool_size: int = 512, group_size: int = 1,
                 linear: str = "last", generator: torch.Generator | None = None) -> Pools:
    """Pools drawn from N(0, 1), the authors' initialisation before pretraining."""
    device = generator.device if generator is not None else None
    return {n: torch.randn(pool_size, group_dim(m, group_size), generator=generator,
                           device=device)
            for n, m in convertible_layers(model, linear).items()}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def nwsify(model: nn.Module, pool_size: int = 512, group_size: int = 1, *,
           pools: Pools | None = None, linear: str = "last",
           generator: torch.Generator | None = None, search: str | None = None) -> nn.Module:
    """Replace convolutions and the last Linear of ``model`` (in place) by NWS layers.

    The current weights become the temporary kernels W. ``pools`` (layer name -> (n, dim))
    defaults to N(0, 1) pools of ``pool_size`` entries. The converted Linear loses its bias
    (a 1x1 convolution without bias, as in the paper). ``search``: the layers' search path
    (``"full"``, ``"certificates"``; None: ``$NWS_SEARCH``, else by device, see
    :class:`~nws.layer.NWSLayer`). The new layers form one :class:`~nws.layer.SearchGroup`
    (one batched full search per forward). Returns ``model``.
    """
    targets = convertible_layers(model, linear)
    if pools is None:
        pools = random_pools(model, pool_size, group_size, linear, generator)
    missing = set(targets) - set(pools)
    if missing:
        raise ValueError(f"no pool for layer(s) {sorted(missing)}")
    layers = []
    for name, mod in targets.items():
        pool = pools[name].to(mod.weight.device)
        if isinstance(mod, nn.Conv2d):
            layer: NWSLayer = NWSConv2d(mod, pool, group_size, search)
        else:
            layer = NWSLinear(mod.weight, pool, group_size, search=search)
        _set_module(model, name, layer)
        layers.append(layer)
    group = SearchGroup(layers)
    for layer in layers:
        layer.search_group = group
    return model


def set_search_path(model: nn.Module, search: str | None) -> nn.Module:
    """Set the search path of every NWS layer of ``model`` (None: by ``$NWS_SEARCH`` or
    device). Returns ``model``."""
    for layer in nws_layers(model).values():
        if search is not None:
            search_path(layer.weight.device, search)  # validates the name
        layer.search_path = search
    return model


def nws_layers(model: nn.Module) -> dict[str, NWSLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NWSLayer)}


def similarity_loss(model: nn.Module, beta: float = 1.0) -> torch.Tensor:
    """beta x sum over NWS layers of mean((sg(K) - W)^2).

    beta = 1 is the paper's Eq. 2 (unweighted); the authors' code weights it (0.5 on
    Split-CIFAR-100, 0.1 on CUB-to-Sketches).
    """
    layers = list(nws_layers(model).values())
    if not layers:
        raise ValueError("the model has no NWS layers; call nws.nwsify first")
    return similarity_sum(layers, beta)


def distillation_loss(model: nn.Module) -> torch.Tensor:
    """Sum over layers of mean((sg(W) - K)^2), differentiable w.r.t. the pools (Eq. 4)."""
    return torch.stack([layer.distillation() for layer in nws_layers(model).values()]).sum()


def get_pools(model: nn.Module) -> Pools:
    return {n: m.pool.detach().clone() for n, m in nws_layers(model).items()}


def encode(model: nn.Module) -> Indices:
    """The task model as indices: per layer, out-major then input channel (Algorithm 1, E)."""
    return {n: m.indices().cpu() for n, m in nws_layers(model).items()}


def lookup(pools: Pools, indices: Indices, shapes: dict[str, torch.Size]) -> dict[str,
                                                                                   torch.Tensor]:
    """Kernels from indices (Algorithm 1, D): layer name -> weight of ``shapes[name]``."""
    return {n: pools[n][indices[n].long()].reshape(shapes[n]) for n in indices}


@torch.no_grad()
def decode_into(model: nn.Module, pools: Pools, indices: Indices) -> nn.Module:
    """Set the weights (W for NWS layers, the weight of plain layers) of the layers named in
    ``indices`` to the looked-up kernels. Returns ``model``."""
    shapes = {n: model.get_submodule(n).weight.shape for n in indices}
    for name, w in lookup(pools, indices, shapes).items():
        model.get_submodule(name).weight.copy_(w)
    return model


def to_plain(model: nn.Module) -> nn.Module:
    """Replace every NWS layer (in place) by the plain module with its selected kernels."""
    for name, layer in nws_layers(model).items():
        _set_module(model, name, layer.to_plain())
    return model
