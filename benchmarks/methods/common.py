"""Small pieces the baselines share: state-dict filtering, straight-through rounding, the
shared conv backbone, per-task BN + head state, and analytic byte counts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from benchmarks.core.protocols import Protocol
from benchmarks.core.store import ArtifactStore
from benchmarks.methods.contract import MethodContext
from benchmarks.models import archs
from nws.convert import is_plain_conv

FLOAT32 = 4


def inference_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state needed at inference: parameters and BN running stats (no batch counters)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def load_inference_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load :func:`inference_state` output; anything but batch counters missing is an error."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"stored state does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Affine parameters and running statistics of every BatchNorm layer."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for key in ("weight", "bias", "running_mean", "running_var"):
                out[f"{name}.{key}"] = getattr(m, key).detach()
    return out


def bn_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in bn_state(model).values())


def head_bytes(in_features: int, num_classes: int) -> int:
    return (in_features * num_classes + num_classes) * FLOAT32


# -- shared by KSM, PackNet and AQD ------------------------------------------------------------


def with_quick_epochs(protocol: Protocol, epochs: int, method: str) -> Protocol:
    """A method's own epoch count under the ``quick`` protocol only (milestones scaled).

    For methods that need longer than ``quick``'s 4 epochs to learn the mini benchmark from
    a random init (KSM, AQD); paper protocols are never changed. Provenance says so.
    """
    if protocol.name != "quick":
        return protocol
    scale = epochs / protocol.epochs
    prov = dict(protocol.provenance) | {
        "epochs": f"{method} quick setting (option quick_epochs)",
        "lr_milestones": f"quick's milestones scaled to {method}'s quick epochs",
    }
    return replace(protocol, epochs=epochs, provenance=prov,
                   lr_milestones=tuple(round(m * scale) for m in protocol.lr_milestones))


def ste(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator whose forward value is exactly ``hard``.

    ``hard.detach() + (soft - soft.detach())`` adds an exact zero, so the value is bit-equal
    to ``hard`` (the usual ``soft + (hard - soft).detach()`` is not), while the gradient is
    that of ``soft``. Exactness makes a model rebuilt from stored codes/masks give the same
    logits as the trained one.
    """
    return hard.detach() + (soft - soft.detach())


def conv_modules(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every ``nn.Conv2d`` (stem and shortcuts included), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def conv_weight_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<conv>.weight": weight}`` of every conv: the backbone KSM and PackNet share."""
    out = {}
    for name, conv in conv_modules(model):
        if conv.bias is not None:
            raise ValueError(f"conv {name} has a bias; the shared backbone holds weights only")
        out[f"{name}.weight"] = conv.weight.detach()
    return out


def conv_weight_count(model: nn.Module) -> int:
    return sum(conv.weight.numel() for _, conv in conv_modules(model))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def task_state(model: nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """What KSM, PackNet and AQD keep per task besides their own encoding: BN and head."""
    head = archs.ARCHS.get(arch).head
    out = dict(bn_state(model))
    for key, value in archs.get_head(model, arch).state_dict().items():
        out[f"{head}.{key}"] = value.detach()
    return out


def is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def is_bias_free_plain_conv(module: nn.Module) -> bool:
    return is_plain_conv(module) and module.bias is None


def keeps_masked_backbone(module: nn.Module) -> bool:
    """What KSM and AQD keep of a model besides the head: BN, and bias-free plain convs
    (they replace the convs by their own layers, which compute a plain conv)."""
    return is_bias_free_plain_conv(module) or is_bn(module)


MASKED_BACKBONE = "BatchNorm and bias-free plain nn.Conv2d layers (and the head)"


def check_arch_stored(method: str, arch: str, keeps: Callable[[nn.Module], bool],
                      what: str) -> None:
    """Refuse (``ValueError``, CLI exit 2) an architecture holding a parameter or persistent
    buffer in a module that ``method`` neither keeps (``keeps(module)``) nor has as head:
    such a tensor would be trained but not stored, and the model rebuilt from the store
    would be another (all the suite's own archs pass; a timm model with LayerNorm, a
    conv bias or timm's ``Conv2dSame`` may not). ``what``: what the method keeps, in words.
    On a shapes-only model: no weights are made."""
    model = shape_model(arch)
    head = archs.get_head(model, arch)
    kept = {n for n, m in model.named_modules() if m is head or keeps(m)}
    modules = dict(model.named_modules())
    lost = [k for k in model.state_dict() if k.rpartition(".")[0] not in kept]
    if lost:
        shown = [f"{k} ({_kind(modules[k.rpartition('.')[0]])})" for k in lost[:6]]
        raise ValueError(
            f"method {method} cannot run on --arch {arch}: it keeps only {what}, and "
            f"{len(lost)} tensors of {arch} lie elsewhere (they would be trained but not "
            f"stored): {', '.join(shown)}{' ...' if len(lost) > 6 else ''}. Use another "
            f"--arch, or --method finetune (it stores whole models)")


def _kind(module: nn.Module) -> str:
    with_bias = isinstance(module, nn.Conv2d) and module.bias is not None
    return type(module).__name__ + (" with bias" if with_bias else "")


def shape_model(arch: str, num_classes: int = archs.IMAGENET_CLASSES) -> nn.Module:
    """``arch`` on the meta device: shapes for byte formulas, without initialising weights."""
    with torch.device("meta"):
        return archs.build(arch, num_classes)


def task_state_bytes(arch: str, num_classes: int) -> int:
    """Analytic bytes of :func:`task_state` (float32 BN and head)."""
    model = shape_model(arch, num_classes)
    return bn_bytes(model) + head_bytes(archs.get_head(model, arch).in_features, num_classes)


def load_partial_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load a subset of a state dict; a key the model lacks, or a shape mismatch, is an error."""
    own = model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"stored state does not fit the model: {bad[:5]}")
    model.load_state_dict(state, strict=False)
    return model


BACKBONE = "backbone"


def stored_backbone(store: ArtifactStore) -> dict[str, torch.Tensor] | None:
    """The shared conv backbone if an earlier task stored it, else ``None``."""
    return store.get_tensors(BACKBONE) if BACKBONE in store.names() else None


def fresh_task_model(ctx: MethodContext, task_classes: int,
                     backbone: dict[str, torch.Tensor] | None) -> nn.Module:
    """The pretrained model (BN from pretraining) with a new head, conv weights from
    ``backbone`` when given (a stored shared backbone), else the pretrained ones."""
    model = ctx.pretrained.model()
    if backbone is not None:
        load_partial_state(model, backbone)
    archs.set_head(model, ctx.arch, archs.new_head(model, ctx.arch, task_classes))
    return model
