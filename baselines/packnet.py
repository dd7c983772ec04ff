"""PackNet: one shared backbone, an owner id per conv weight, prune + retrain per task.

Owner ids: 0 = free, task index t owns id t + 1. Task t claims every free weight, trains with
the gradients of older tasks' weights zeroed after every backward (weight decay is added to
the gradients by hand *before* that zeroing; the optimiser applies none, so frozen weights
never drift), prunes a fraction of its own weights per layer by magnitude (id 0, value 0)
and retrains the rest. BatchNorm and head are per task. Inference for task t rebuilds a model
from the store that keeps the weights with 1 <= id <= t + 1 (a copy: nothing is zeroed in
place). Each task walks an explicit state machine (train -> pruned -> retrained -> frozen, or
train -> frozen when it prunes nothing) that raises on any other step.

Two choices follow the reference (ivclab/CPG, the PackNet whose checkpoints the NWS authors'
memory script reads), each with the suite's earlier choice as an option:

- ``decay="conv"``: the hand-written weight decay reaches conv weights only
  (``utils/packnet_prune.py`` 146-159, ``do_weight_decay_and_make_grads_zero``: Conv2d/Linear
  weights outside the classifiers; ``packnet_cifar100_main_normal.py`` 226-230 builds SGD with
  weight_decay=0.0, so BN and head are never decayed). ``"all"``: every trained parameter.
- ``bn_start="previous"``: task t > 0 starts from task t-1's final BN (CPG's finetune run
  loads the previous task's checkpoint, ``utils/packnet_manager.py`` 187-202 ``load_checkpoint``,
  which copies every entry but the classifier; ``experiment1/PackNet_cifar100.sh`` passes
  the previous task's folder as ``--load_folder``). ``"pretrained"``: from the pretrained BN.

Stored: the backbone once (float32 conv weights) and the owner ids packed at
ceil(log2(T + 1)) bits per weight (both shared, rewritten after each task), BN and head per
task. When no free weight is left a task trains only its BN and head: it warns loudly, and
the ``packnet_capacity_fraction`` row records it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from enum import Enum
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from benchmarks.core.checks import Each, Either, OneOf, Range
from benchmarks.core.protocols import Protocol, S
from benchmarks.core.store import ArtifactStore, Transaction
from benchmarks.methods.common import (
    BACKBONE,
    FLOAT32,
    bn_state,
    check_arch_stored,
    conv_modules,
    conv_weight_count,
    conv_weight_state,
    fresh_task_model,
    is_bn,
    load_partial_state,
    shape_model,
    stored_backbone,
    task_state,
    task_state_bytes,
)
from benchmarks.methods.contract import Breakdown, Fit, Method, MethodContext, TaskInfo
from benchmarks.models import archs
from nws import bitpack

log = logging.getLogger("benchmarks")
OWNERS = "owners"
REF = "docs/reference.md §4 (PackNet, CIFAR variant used by the NWS authors)"
CPG = "ivclab/CPG"
CHOICES = {"decay": ("conv", "all"), "bn_start": ("previous", "pretrained")}


class Phase(Enum):
    TRAIN = "train"
    PRUNED = "pruned"
    RETRAINED = "retrained"
    FROZEN = "frozen"


_LEGAL = {
    None: {Phase.TRAIN},
    Phase.TRAIN: {Phase.PRUNED, Phase.FROZEN},
    Phase.PRUNED: {Phase.RETRAINED},
    Phase.RETRAINED: {Phase.FROZEN},
    Phase.FROZEN: set(),
}


class IllegalTransitionError(RuntimeError):
    """A PackNet task stepped out of train -> pruned -> retrained -> frozen."""


class TaskStateMachine:
    def __init__(self) -> None:
        self.phase: Phase | None = None

    def advance(self, to: Phase) -> None:
        if to not in _LEGAL[self.phase]:
            now = self.phase.value if self.phase else "start"
            raise IllegalTransitionError(f"PackNet: illegal transition {now} -> {to.value}")
        self.phase = to

    def require(self, phase: Phase, action: str) -> None:
        if self.phase is not phase:
            now = self.phase.value if self.phase else "start"
            raise IllegalTransitionError(f"PackNet: cannot {action} in phase {now}")


def prune_fractions(spec: float | str, num_tasks: int) -> list[float]:
    """Per-task prune fraction: a number for every task, or 'equal-share' (ours): task t keeps
    1 / (T - t) of the free weights, so each of T tasks ends with an equal share."""
    if spec == "equal-share":
        return [1 - 1 / (num_tasks - t) for t in range(num_tasks)]
    if isinstance(spec, (int, float)) and 0 <= spec < 1:
        return [float(spec)] * num_tasks
    raise ValueError(f"prune must be a fraction in [0, 1) or 'equal-share', not {spec!r}")


def unpack_owners(store: ArtifactStore, model: nn.Module) -> dict[str, torch.Tensor]:
    """Owner ids per conv weight (int64, the weight's shape) from the shared blob."""
    info = store.info(OWNERS)
    flat = torch.from_numpy(bitpack.unpack(store.get_bytes(OWNERS), info.meta["bits"],
                                           info.meta["count"]))
    out, offset = {}, 0
    for name, w in conv_weight_state(model).items():
        out[name] = flat[offset: offset + w.numel()].view(w.shape)
        offset += w.numel()
    if offset != flat.numel():
        raise ValueError(f"stored owner ids ({flat.numel()}) do not fit the model ({offset})")
    return out


QUICK_RETRAIN = (
    "ours: (epochs fraction, lr factor) of retraining under the quick protocol only. From a "
    "random init, pruning 80% after quick's 4 epochs needs more: on digits_01, 1 epoch at "
    "lr/10 (the scaled reference) measured 49.2%, 4 epochs at lr/10 90.0%, 2 at lr 65.8%, "
    "4 at lr 100%"
)


def _smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` smallest of ``values`` (1-D), ties taken in index order:
    the first ``k`` of a stable ascending sort, found by one selection (``kthvalue``) instead
    of sorting (measured: docs/performance.md, The quick start)."""
    threshold = torch.kthvalue(values, k).values
    chosen = values < threshold
    ties = (values == threshold).nonzero().squeeze(1)[: k - int(chosen.sum())]
    chosen[ties] = True
    return chosen


# valid ranges of the options (benchmarks.core.checks)
PRUNE = Either((OneOf(("equal-share",), "ours: an equal share per task"),
                Range(0, 1, "a fraction of the free weights pruned after each task: 1 "
                      "leaves the next task none", hi_open=True)), "prune_fractions' rule")
FRACTION = Range(0, 1, "a fraction of the training (resp. retrain) epochs", lo_open=True)
LR_FACTOR = Range(0, 1, "the retrain lr as a fraction of the training lr", lo_open=True)
QUICK = Each(Range(0, None, "a positive factor", lo_open=True),
             "(retrain epochs fraction, lr factor) under the quick protocol", length=2)


def _keeps(module: nn.Module) -> bool:
    """What PackNet keeps besides the head: BN, and bias-free convs (masked in place, so a
    conv subclass keeps its own forward)."""
    return is_bn(module) or (isinstance(module, nn.Conv2d) and module.bias is None)


class PackNet(Method):
    name = "packnet"
    optimizer_weight_decay = False  # applied by hand in after_backward
    # 2: decay on conv weights only, task t > 0 from task t-1's BN (docs/reproducibility.md)
    rule_version = 2
    SETTINGS: ClassVar[dict[str, dict[str, S]]] = {
        "default": {
            "prune": S("equal-share", "ours: every task keeps an equal share of the backbone",
                       PRUNE),
            "retrain_epochs_fraction": S(0.3, REF + ": 30 retrain epochs per 100 training",
                                         FRACTION),
            "retrain_lr_factor": S(0.1, REF + ": retrain lr 1e-3 against 1e-2", LR_FACTOR),
            "retrain_milestone_fraction": S(25 / 30, REF + ": lr x0.1 at retrain epoch 25",
                                            FRACTION),
            "quick_retrain": S((1.0, 1.0), QUICK_RETRAIN, QUICK),
            "decay": S("conv", CPG + " utils/packnet_prune.py: weight decay on conv weights "
                               "only; 'all': every trained parameter (the suite's earlier rule)",
                       OneOf(CHOICES["decay"], "the parameter sets the hand-written decay "
                                               "reaches")),
            "bn_start": S("previous", CPG + " utils/packnet_manager.py load_checkpoint: task t>0 "
                                      "starts from task t-1's BN; 'pretrained': from the "
                                      "pretrained BN (the suite's earlier rule)",
                          OneOf(CHOICES["bn_start"], "where task t > 0 takes its BN from")),
        },
        "split_cifar100": {"prune": S(0.6, REF, PRUNE)},
        "cub_to_sketches": {
            "prune": S("equal-share", "ours (docs/reference.md §4): 0.8, 0.75, 0.667, 0.5, none",
                       PRUNE),
        },
    }

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        check_arch_stored(self.name, ctx.arch, _keeps, "BatchNorm and bias-free nn.Conv2d "
                          "layers (and the head)")
        self.fractions = prune_fractions(self.opt["prune"], len(ctx.tasks))
        self.bits = bitpack.bits_for(len(ctx.tasks) + 1)
        self._reset_task_state()

    def _reset_task_state(self) -> None:
        self.machine = TaskStateMachine()
        self.task_id = 0
        self.owners: dict[str, torch.Tensor] = {}  # conv name -> owner ids of the live task
        self._masks: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._masks_key: tuple | None = None  # what _masks were built for; None: rebuild

    def retrain_protocol(self, protocol: Protocol) -> Protocol:
        """The main protocol scaled to PackNet's retraining (30 ep, lr/10, drop at 25 of 100)."""
        fraction, lr_factor = self.opt["retrain_epochs_fraction"], self.opt["retrain_lr_factor"]
        src = "PackNet retraining, scaled from the training protocol"
        if protocol.name == "quick":
            (fraction, lr_factor), src = self.opt["quick_retrain"], "PackNet quick_retrain"
        epochs = max(1, round(protocol.epochs * fraction))
        milestone = round(epochs * self.opt["retrain_milestone_fraction"])
        return replace(
            protocol, epochs=epochs, lr=protocol.lr * lr_factor,
            lr_milestones=(milestone,) if 0 < milestone < epochs else (),
            schedule="multistep",
            provenance=protocol.provenance | {k: src for k in ("epochs", "lr", "lr_milestones")},
        )

    # -- training ------------------------------------------------------------------------
    def model_for_task(self, task: TaskInfo, store: ArtifactStore) -> nn.Module:
        self._reset_task_state()
        backbone = stored_backbone(store)
        model = fresh_task_model(self.ctx, task.num_classes, backbone)
        if task.index > 0 and self.opt["bn_start"] == "previous":
            load_partial_state(model, {k: v for k, v in store.get_tensors(
                "state", task.index - 1).items() if k in bn_state(model)})
        if backbone is None:
            owners = {k: torch.zeros(w.shape, dtype=torch.int64)
                      for k, w in conv_weight_state(model).items()}
        else:
            owners = unpack_owners(store, model)
        self.task_id = task.index + 1
        no_room = []
        for key, ids in owners.items():
            if bool((ids > task.index).any()):
                raise RuntimeError(f"stored owner ids of {key} name tasks after {task.index}")
            free = ids == 0
            if not bool(free.any()):
                no_room.append(key)
            self.owners[key.removesuffix(".weight")] = torch.where(free, self.task_id, ids)
        if no_room:
            msg = (f"PackNet task {task.index}: no free weights left in {len(no_room)} of "
                   f"{len(owners)} conv layers ({no_room[:3]}...); those layers stay frozen "
                   f"for this task, only BN and head train there")
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
        self.machine.advance(Phase.TRAIN)
        return model

    def _ids(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Owner ids of conv ``name``, kept on the device of ``like``."""
        ids = self.owners[name]
        if ids.device != like.device:
            ids = self.owners[name] = ids.to(like.device)
        return ids

    def _own(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return self._ids(name, like) == self.task_id

    def _step_masks(self, convs: list[tuple[str, nn.Conv2d]]
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per conv, as float tensors of the weight's shape, dtype and device: 1 where this
        task owns the weight (its gradient survives), and 1 where the weight is not free (it
        survives ``after_step``). Built once per owner-id change (task start, prune), so a
        training step reads them without comparing ids (no per-layer ops per step)."""
        key = tuple((n, c.weight.device, c.weight.dtype) for n, c in convs)
        if self._masks_key != key:
            own, keep = [], []
            for name, conv in convs:
                ids = self._ids(name, conv.weight)
                own.append((ids == self.task_id).to(conv.weight.dtype))
                keep.append((ids != 0).to(conv.weight.dtype))
            self._masks, self._masks_key = (own, keep), key
        return self._masks

    def decayed(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the hand-written weight decay reaches (option ``decay``): conv
        weights (the reference), or every parameter."""
        if self.opt["decay"] == "all":
            return list(model.parameters())
        return [c.weight for _, c in conv_modules(model)]

    def after_backward(self, model: nn.Module) -> None:
        """Weight decay into the gradients of :meth:`decayed`, then older tasks' (and free)
        weights' gradients zeroed: two multi-tensor ops for the whole model."""
        wd = self.ctx.protocol.weight_decay
        params = [p for p in self.decayed(model) if p.grad is not None]
        convs = conv_modules(model)
        own, _ = self._step_masks(convs)
        pairs = [(c.weight.grad, m) for (_, c), m in zip(convs, own, strict=True)
                 if c.weight.grad is not None]
        with torch.no_grad():
            if wd and params:
                torch._foreach_add_([p.grad for p in params], params, alpha=wd)
            if pairs:
                torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    def after_step(self, model: nn.Module) -> None:
        """Free (pruned) weights stay exactly zero. They are +0 already (zeroed at pruning,
        their gradients are zeroed and PackNet's optimiser applies no weight decay), so the
        multiplication by the 0/1 mask keeps every weight bit for bit; it guards against an
        optimiser that would move them."""
        convs = conv_modules(model)
        _, keep = self._step_masks(convs)
        with torch.no_grad():
            torch._foreach_mul_([c.weight for _, c in convs], keep)

    def prune(self, model: nn.Module, fraction: float) -> None:
        """Free ``fraction`` of this task's weights in every layer, smallest magnitude first."""
        self.machine.advance(Phase.PRUNED)
        with torch.no_grad():
            for name, conv in conv_modules(model):
                own = self._own(name, conv.weight)
                n_own = int(own.sum())
                k = round(fraction * n_own)
                if k == 0:
                    continue
                mags = conv.weight.detach().abs()[own]
                idx = own.flatten().nonzero().squeeze(1)[_smallest(mags, k)]
                ids = self.owners[name].flatten().clone()
                ids[idx] = 0
                self.owners[name] = ids.view_as(conv.weight)
                self._masks_key = None
                conv.weight.view(-1)[idx] = 0.0
                if int((self.owners[name] == self.task_id).sum()) != n_own - k:
                    raise RuntimeError(f"PackNet: pruning {name} failed")

    def finish_task(self, task: TaskInfo, model: nn.Module, fit: Fit) -> None:
        fraction = self.fractions[task.index]
        if fraction > 0:
            self.prune(model, fraction)
            fit(model, self.retrain_protocol(self.ctx.protocol), "retrain")
            self.machine.advance(Phase.RETRAINED)
        self.machine.advance(Phase.FROZEN)

    # -- storage -------------------------------------------------------------------------
    def save_task(self, task: TaskInfo, model: nn.Module, tx: Transaction) -> None:
        self.machine.require(Phase.FROZEN, "save")
        weights = {k: w.cpu() for k, w in conv_weight_state(model).items()}
        owners = {f"{n}.weight": ids.cpu() for n, ids in self.owners.items()}
        previous = stored_backbone(tx.store)
        for key, w in weights.items():  # fail loudly rather than store a broken backbone
            ids = owners[key]
            if bool(w[ids == 0].any()):
                raise RuntimeError(f"PackNet: free weights of {key} are not zero; not saving")
            old = (ids >= 1) & (ids < self.task_id)
            if previous is not None and not torch.equal(w[old], previous[key][old]):
                raise RuntimeError(f"PackNet: older tasks' weights of {key} changed; not saving")
        flat = torch.cat([ids.flatten() for ids in owners.values()]).numpy()
        tx.put(OWNERS, bitpack.pack(flat, self.bits), task=None, codec="bitpack",
               meta={"bits": self.bits, "count": int(flat.size)})
        tx.put_tensors(BACKBONE, weights, task=None)
        tx.put_tensors("state", task_state(model, self.ctx.arch), task=task.index)

    def load_task(self, task: TaskInfo, store: ArtifactStore) -> nn.Module:
        model = archs.build(self.ctx.arch, task.num_classes)
        owners = unpack_owners(store, model)
        backbone = store.get_tensors(BACKBONE)
        visible = {k: torch.where((owners[k] >= 1) & (owners[k] <= task.index + 1), w,
                                  torch.zeros_like(w)) for k, w in backbone.items()}
        load_partial_state(model, visible)
        load_partial_state(model, store.get_tensors("state", task.index))
        return model.eval()

    def task_metrics(self, task: TaskInfo, store: ArtifactStore) -> dict[str, float]:
        """Shares of all conv weights after this task (the store's owner ids then)."""
        if store.tasks()[-1] != task.index:
            return {}  # owner ids were rewritten by a later task
        ids = np.concatenate([v.flatten().numpy() for v in
                              unpack_owners(store, shape_model(self.ctx.arch)).values()])
        own, free = float((ids == task.index + 1).mean()), float((ids == 0).mean())
        return {"packnet_capacity_fraction": own + free, "packnet_kept_fraction": own,
                "packnet_free_fraction": free}

    @classmethod
    def memory_formula(cls, arch: str, num_classes: list[int],
                       options: dict[str, Any]) -> Breakdown:
        n = conv_weight_count(shape_model(arch))
        bits = bitpack.bits_for(len(num_classes) + 1)
        return Breakdown(
            shared={BACKBONE: n * FLOAT32, OWNERS: bitpack.packed_nbytes(n, bits)},
            per_task=[{"state": task_state_bytes(arch, c)} for c in num_classes],
        )
