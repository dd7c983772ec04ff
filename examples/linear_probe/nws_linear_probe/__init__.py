"""The frozen-backbone linear probe: an external method for the NWS benchmark suite.

Per task, a new linear head (and, by default, the BatchNorm layers) is trained over a frozen
pretrained backbone, the one ``--pretrained`` gives (the benchmark's default: ImageNet for the
paper's benchmarks, a random init for ``split_digits``). No task changes what another task
uses, so nothing is forgotten; what a task can learn is bounded by the frozen features. This
is the usual lower bound for methods that adapt a pretrained network per task (KSM, PackNet,
NWS): the "feature extraction" baseline of Learning without Forgetting (Li & Hoiem, ECCV 2016:
shared parameters unchanged, only the new task's output layer trained), and FACIL's
``freezing`` approach (mmasana/FACIL ``src/approach/freezing.py``: after the task given by
``--freeze-after``, default 0, only the current head is trained and the backbone runs in eval
mode; here ImageNet pretraining plays the part of the first task).

Option ``bn`` (``--opt bn=...``):

- ``task`` (default): every BatchNorm2d layer's affine parameters and running statistics are
  trained per task and stored with the head, as the per-task "scale and bias" model patch of
  Mudrakarta et al., "K for the Price of 1" (ICLR 2019), and as the suite's KSM, PackNet and
  AQD keep BN per task (``benchmarks.methods.common.task_state``).
- ``frozen``: the pretrained BatchNorm layers are frozen too (torchvision's
  ``FrozenBatchNorm2d``: the running statistics normalise, also while training), as in LwF's
  feature extraction and FACIL's ``freezing`` (``self.model.model.eval()``): only the head
  is trained and stored per task; BN's tensors join the shared backbone. Plain
  ``nn.BatchNorm2d`` only: an architecture with other BatchNorm kinds (timm's
  ``BatchNormAct2d``) is refused before any run folder.

Stored: the frozen backbone once (``backbone``, shared: every float32 tensor of the model's
inference state but the per-task ones), and per task ``state``: the head and, with
``bn=task``, the BatchNorm tensors. The backbone is stored, not rebuilt from the pretrained
weights, so a task is rebuilt from the store alone (the suite's contract) and its memory is
counted the way KSM's frozen backbone is.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from benchmarks.core.checks import OneOf
from benchmarks.core.protocols import S
from benchmarks.core.store import ArtifactStore, Transaction
from benchmarks.methods.common import (
    BACKBONE,
    fresh_task_model,
    inference_state,
    load_partial_state,
    set_submodule,
    shape_model,
    stored_backbone,
    task_state,
)
from benchmarks.methods.contract import Breakdown, Method, MethodContext, TaskInfo
from benchmarks.models import archs

__all__ = ["LinearProbe"]

LWF = ("Li & Hoiem, Learning without Forgetting (ECCV 2016), the 'feature extraction' "
       "baseline; mmasana/FACIL src/approach/freezing.py")
BN_RULES = OneOf(("task", "frozen"), "per-task BatchNorm, or the pretrained one frozen")


def check_freezable(model: nn.Module, arch: str) -> None:
    """``bn=frozen`` replaces plain ``nn.BatchNorm2d`` layers only: another BatchNorm kind
    (``BatchNorm1d``, timm's ``BatchNormAct2d``, which also applies an activation) would
    either keep training or lose its extra part. ``ValueError`` (CLI exit 2) naming them."""
    odd = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) is not nn.BatchNorm2d]
    if odd:
        more = f" and {len(odd) - 4} more" if len(odd) > 4 else ""
        raise ValueError(f"linear-probe --opt bn=frozen freezes plain nn.BatchNorm2d layers "
                         f"only; --arch {arch} has {len(odd)} other BatchNorm layers: "
                         f"{', '.join(odd[:4])}{more}. Use --opt bn=task (or another --arch)")


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Every ``nn.BatchNorm2d`` becomes a ``FrozenBatchNorm2d`` holding its current tensors
    (same state-dict keys, no batch counter): it normalises with the running statistics in
    training too."""
    for name, bn in list(model.named_modules()):
        if type(bn) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(bn, key))
            set_submodule(model, name, frozen)
    return model


def split_state(model: nn.Module, arch: str) -> tuple[dict[str, torch.Tensor],
                                                      dict[str, torch.Tensor]]:
    """``(backbone, per_task)``: the per-task tensors are the head and the (trainable)
    BatchNorm layers; the backbone is every other tensor of the inference state."""
    own = task_state(model, arch)
    return {k: v for k, v in inference_state(model).items() if k not in own}, own


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class LinearProbe(Method):
    """Per task a new head and BatchNorm over a frozen pretrained backbone (a lower bound)."""

    name = "linear-probe"
    SETTINGS: ClassVar[dict[str, dict[str, S]]] = {"default": {
        "bn": S("task", "Mudrakarta et al., K for the Price of 1 (ICLR 2019): a per-task "
                        "BatchNorm scale-and-bias patch; 'frozen': " + LWF, BN_RULES),
    }}

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if self.opt["bn"] == "frozen":  # before any run folder (the harness makes it after)
            check_freezable(shape_model(ctx.arch), ctx.arch)

    def _prepare(self, model: nn.Module) -> nn.Module:
        return freeze_batchnorm(model) if self.opt["bn"] == "frozen" else model

    def model_for_task(self, task: TaskInfo, store: ArtifactStore) -> nn.Module:
        model = self._prepare(fresh_task_model(self.ctx, task.num_classes, stored_backbone(store)))
        trained = task_state(model, self.ctx.arch)  # the head, and BN unless frozen
        for key, param in model.named_parameters():
            param.requires_grad_(key in trained)
        return model

    def save_task(self, task: TaskInfo, model: nn.Module, tx: Transaction) -> None:
        backbone, state = split_state(model, self.ctx.arch)
        stored = stored_backbone(tx.store)
        if stored is None:
            tx.put_tensors(BACKBONE, backbone, task=None)
        elif any(not torch.equal(stored[k], v.cpu()) for k, v in backbone.items()):
            raise RuntimeError("the linear probe's frozen backbone changed during training; "
                               "not saving")
        tx.put_tensors("state", state, task=task.index)

    def load_task(self, task: TaskInfo, store: ArtifactStore) -> nn.Module:
        model = self._prepare(archs.build(self.ctx.arch, task.num_classes))
        load_partial_state(model, store.get_tensors(BACKBONE))
        return load_partial_state(model, store.get_tensors("state", task.index)).eval()

    @classmethod
    def memory_formula(cls, arch: str, num_classes: list[int],
                       options: dict[str, Any]) -> Breakdown:
        def shapes(classes: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
            with torch.device("meta"):  # shapes only
                model = shape_model(arch, classes)
                model = freeze_batchnorm(model) if options["bn"] == "frozen" else model
            return split_state(model, arch)

        return Breakdown(shared={BACKBONE: nbytes(shapes(archs.IMAGENET_CLASSES)[0])},
                         per_task=[{"state": nbytes(shapes(c)[1])} for c in num_classes])
