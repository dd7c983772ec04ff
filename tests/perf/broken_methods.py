"""Deliberately broken methods the conformance check must flag
(:mod:`benchmarks.perf.conformance`; tests/perf/test_conformance.py). Each is Finetune with one
rule of the method contract broken, and a name of its own (a plugin may not take a built-in's).
Resolve them by module path, e.g. ``tests.perf.broken_methods:ServesFromMemory``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from baselines.finetune import Finetune
from benchmarks.core.breakdown import Breakdown
from benchmarks.core.store import ArtifactStore, Transaction
from benchmarks.methods.common import FLOAT32
from benchmarks.methods.contract import TaskInfo
from benchmarks.models import archs


class ServesFromMemory(Finetune):
    """Breaks (a): keeps each trained model in the instance and serves it from there; the
    store gets no weights (only the harness's bookkeeping), and the formula says so. A
    process that did not train the task gets a stand-in: every float tensor 0.01 (no NaN,
    so nothing but the logits gives it away)."""

    name = "broken-serves-from-memory"

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.kept: dict[int, nn.Module] = {}

    def save_task(self, task: TaskInfo, model: nn.Module, tx: Transaction) -> None:
        self.kept[task.index] = copy.deepcopy(model)

    def load_task(self, task: TaskInfo, store: ArtifactStore) -> nn.Module:
        if task.index in self.kept:
            return copy.deepcopy(self.kept[task.index])
        model = archs.build(self.ctx.arch, task.num_classes)
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.fill_(0.01)
        return model

    @classmethod
    def memory_formula(cls, arch: str, num_classes: list[int],
                       options: dict[str, Any]) -> Breakdown:
        return Breakdown(shared={}, per_task=[{} for _ in num_classes])


class FormulaOffByOneTensor(Finetune):
    """Breaks (b): the formula leaves out one tensor, the head's bias (num_classes floats)."""

    name = "broken-formula-off-by-one"

    @classmethod
    def memory_formula(cls, arch: str, num_classes: list[int],
                       options: dict[str, Any]) -> Breakdown:
        right = super().memory_formula(arch, num_classes, options)
        return Breakdown(shared=right.shared, per_task=[
            {"model": d["model"] - c * FLOAT32}
            for d, c in zip(right.per_task, num_classes, strict=True)])


class SyncInAfterStep(Finetune):
    """Breaks (d): reads a value on the host after every step (``.item()``: a sync on CUDA)."""

    name = "broken-sync-in-after-step"

    def after_step(self, model: nn.Module) -> None:
        self.first_weight = next(model.parameters()).flatten()[0].item()


def spec(cls: type) -> str:
    """The module-path spec of one of these classes."""
    return f"{__name__}:{cls.__qualname__}"
