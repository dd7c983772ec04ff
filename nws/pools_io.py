"""Pools files: what ``python -m nws.pretrain`` writes, and import of the authors' pools.

A pools file is a ``torch.save`` dict: ``pools`` (layer name -> (n, dim)), ``weights``
(layer name -> the temporary kernels that built them, task 0's starting point), optional
``state`` (the rest of the model's state: BN, ...), and ``group_size``.

The authors' ``KP_resume.pt`` is imported for a given model (:func:`import_authors_pools`):
pools, kernels and every BN tensor, paired with the model's layers in module order. Files
are read with ``weights_only=True`` (tensors and plain containers, never arbitrary code);
what cannot be read or does not fit raises ``ValueError`` naming the file and the key
(the suite's CLI turns that into exit 2).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nws.convert import Pools, convertible_layers, group_dim, nws_layers


@dataclass
class PoolsFile:
    pools: Pools
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    group_size: int = 1


def pools_file_from_model(model: nn.Module) -> PoolsFile:
    """Pools, temporary kernels and the remaining state of an NWS model."""
    layers = nws_layers(model)
    gs = {m.group_size for m in layers.values()}
    sd = model.state_dict()
    owned = {f"{n}.{k}" for n in layers for k in ("weight", "pool", "ema_size", "ema_sum")}
    return PoolsFile(
        pools={n: m.pool.detach().cpu().clone() for n, m in layers.items()},
        weights={n: m.weight.detach().cpu().clone() for n, m in layers.items()},
        state={k: v.cpu() for k, v in sd.items() if k not in owned},
        group_size=gs.pop() if len(gs) == 1 else 1,
    )


def save_pools(path: str | Path, pf: PoolsFile) -> None:
    """Write ``pf`` atomically (:mod:`nws.atomic`: a failed write leaves nothing)."""
    from nws.atomic import atomic_path  # the suite's one atomic writer

    with atomic_path(path) as tmp:
        torch.save({"pools": pf.pools, "weights": pf.weights, "state": pf.state,
                    "group_size": pf.group_size}, tmp)


def _read(path: str | Path) -> object:
    """``torch.load`` restricted to tensors and plain containers (never arbitrary code)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pools file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a torch checkpoint of tensors and plain containers "
                         f"({str(err).splitlines()[0]}); save a plain dict, e.g. "
                         "torch.save({'model': model.state_dict()}, path)") from err


def load_pools(path: str | Path) -> PoolsFile:
    """A file written by :func:`save_pools`; an authors' ``KP_resume.pt`` is refused with
    the way to import it."""
    raw = _read(path)
    if isinstance(raw, dict) and "pools" in raw:
        return PoolsFile(raw["pools"], raw.get("weights", {}), raw.get("state", {}),
                         int(raw.get("group_size", 1)))
    raise ValueError(f"{path} is no pools file; for the authors' checkpoint use "
                     "import_authors_pools(path, model) (--opt pools=authors:PATH)")


Signature = tuple[int, ...]  # what must agree between paired layers (widths, kernel size)


def _pair(ours: dict[str, Signature], theirs: dict[str, Signature], what: str, path: Path,
          key: str) -> dict[str, str]:
    """Our layer name -> the file's: by name where every one of ours is in the file, else
    in module order. Unequal counts raise, naming where the two orders first part: the
    first pair whose signatures differ, else the first layer without a counterpart."""
    if set(ours) <= set(theirs):
        return {n: n for n in ours}
    if len(ours) != len(theirs):
        mine, file = list(ours.items()), list(theirs.items())
        i = next((i for i, (a, b) in enumerate(zip(mine, file, strict=False))
                  if a[1] != b[1]),
                 min(len(mine), len(file)))
        if i < min(len(mine), len(file)):
            where = (f"they first differ at the model's {mine[i][0]!r} {mine[i][1]} vs the "
                     f"file's {file[i][0] + key!r} {file[i][1]}")
        elif len(mine) > len(file):
            where = f"the model's {mine[i][0]!r} has no counterpart"
        else:
            where = f"the file's {file[i][0] + key!r} has no counterpart in the model"
        raise ValueError(f"{path} has {len(theirs)} {what} (keys '*{key}'), the model "
                         f"{len(ours)}; paired in module order, {where}")
    return dict(zip(ours, theirs, strict=True))


def _bn_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


def _bn_state(sd: dict[str, torch.Tensor], model: nn.Module, path: Path) -> dict[str,
                                                                                  torch.Tensor]:
    """Every BatchNorm state of the file under the model's names, paired in module order.

    A BN layer of the file is a prefix with ``.running_mean`` (file order = the authors'
    module order). Each of our BN tensors (affine weight/bias, running mean/var,
    num_batches_tracked) must be in the file with our shape; a file without
    ``num_batches_tracked`` (torch < 0.4.1) keeps the model's counter. Pairing by order
    cannot tell apart two BN layers of equal width that the file stores in another order.
    """
    ours = _bn_layers(model)
    theirs = {k.removesuffix(".running_mean"): tuple(v.shape) for k, v in sd.items()
              if k.endswith(".running_mean")}
    mine = {n: (m.num_features,) for n, m in ours.items()}
    state = {}
    for our_name, src in _pair(mine, theirs, "BatchNorm layers", path,
                               ".running_mean").items():
        for key, own in ours[our_name].state_dict().items():
            value = sd.get(f"{src}.{key}")
            if value is None:
                if key == "num_batches_tracked":
                    continue
                raise ValueError(f"{path} lacks '{src}.{key}' (the model's "
                                 f"'{our_name}.{key}')")
            if value.shape != own.shape:
                raise ValueError(f"{path}: '{src}.{key}' has shape {tuple(value.shape)}, the "
                                 f"model's '{our_name}.{key}' needs {tuple(own.shape)}")
            state[f"{our_name}.{key}"] = value.to(own.dtype)
    return state


def _kernels(weight: torch.Tensor, mod: nn.Module, src: str, ours: str,
             path: Path) -> torch.Tensor:
    """The file's temporary kernels in the shape of our layer ``mod``.

    A classifier (Linear; theirs a 1x1 conv) may have another class count: its rows are
    kept as they are (docs/reference.md §1: task 0's head is the first C rows of the pretrained
    head, see benchmarks.methods.nws_method); only its input width must agree.
    """
    if isinstance(mod, nn.Linear):
        cols = mod.in_features
        if weight.ndim >= 2 and weight[0].numel() == cols:
            return weight.reshape(weight.shape[0], cols).float()
        raise ValueError(f"{path}: '{src}.weight' has shape {tuple(weight.shape)}, the "
                         f"model's classifier '{ours}' needs (classes, {cols}[, 1, 1])")
    if weight.shape != mod.weight.shape and weight.numel() != mod.weight.numel():
        raise ValueError(f"{path}: '{src}.weight' has {weight.numel()} values, layer "
                         f"'{ours}' {mod.weight.numel()} {tuple(mod.weight.shape)}")
    return weight.reshape(mod.weight.shape).float()


def import_authors_pools(path: str | Path, model: nn.Module, linear: str = "last",
                         group_size: int = 1) -> PoolsFile:
    """Pools, temporary kernels and BatchNorm from the authors' ``KP_resume.pt`` for the
    layers of the plain ``model``.

    Their checkpoint holds ``{'model': state_dict, ...}`` (also ``epoch`` and other plain
    entries; loaded with ``weights_only=True``) with, per NWS layer, ``<name>.weight``
    (temporary kernels) and ``<name>.qtz.embed`` of shape (dim, n), plus the model's BN
    tensors; keys may start with ``module.`` (DDP). Their layer names are their ResNet's
    (stem ``conv1.0`` conv, ``conv1.1`` BN, ..., ``last_layer``), so NWS layers and BN
    layers are each paired in module order (by name where every name agrees), checking
    every shape; a mismatch raises ``ValueError`` naming the key and the file.

    The classifier's kernels keep the file's class count (the authors' script defaults to
    CIFAR-100: a 100-class ``last_layer``), so ``weights[head]`` may have other rows than
    the model's head: task 0 takes its first C rows (docs/reference.md §1). Returned ``state``
    holds every BN tensor under the model's names, and any other tensor whose name and
    shape agree with the model's.
    """
    path = Path(path)
    raw = _read(path)
    sd = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a dict with a 'model' state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if torch.is_tensor(v)}
    theirs = {}  # signature: (pool entry length, weights per output channel)
    for k, embed in sd.items():
        if k.endswith(".qtz.embed"):
            src = k.removesuffix(".qtz.embed")
            weight = sd.get(f"{src}.weight")
            theirs[src] = (embed.shape[0], -1 if weight is None else weight[0].numel())
    ours = convertible_layers(model, linear)
    mine = {n: (group_dim(m, group_size), m.weight[0].numel()) for n, m in ours.items()}
    names = _pair(mine, theirs, "NWS layers", path,
                  ".qtz.embed")
    pools, weights, used = {}, {}, set()
    for ours_name, mod in ours.items():
        src = names[ours_name]
        embed, weight = sd[f"{src}.qtz.embed"], sd.get(f"{src}.weight")
        if embed.shape[0] != group_dim(mod, group_size):
            raise ValueError(f"{path}: '{src}.qtz.embed' has shape {tuple(embed.shape)}, "
                             f"layer '{ours_name}' needs ({group_dim(mod, group_size)}, n)")
        pools[ours_name] = embed.t().contiguous().float()
        used |= {k for k in sd if k.startswith(f"{src}.")}
        if weight is not None:
            weights[ours_name] = _kernels(weight, mod, src, ours_name, path)
    state = _bn_state(sd, model, path)
    own, bn = model.state_dict(), _bn_layers(model)
    state |= {k: v for k, v in sd.items() if k in own and k not in used
              and k.rpartition(".")[0] not in bn and own[k].shape == v.shape}
    return PoolsFile(pools, weights, state, group_size)
