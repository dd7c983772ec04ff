"""Finetune: each task finetunes the whole pretrained model with a new head.

Every task starts again from the pretrained weights (not from the previous task's model),
so tasks are independent and the store keeps one full model per task (float32, lossless),
as the paper's Finetune row counts it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from benchmarks.core.store import ArtifactStore, Transaction
from benchmarks.methods.common import FLOAT32, inference_state, load_inference_state
from benchmarks.methods.contract import Breakdown, Method, TaskInfo
from benchmarks.models import archs


class Finetune(Method):
    name = "finetune"

    def model_for_task(self, task: TaskInfo, store: ArtifactStore) -> nn.Module:
        model = self.ctx.pretrained.model()
        archs.set_head(model, self.ctx.arch, archs.new_head(model, self.ctx.arch,
                                                            task.num_classes))
        return model

    def save_task(self, task: TaskInfo, model: nn.Module, tx: Transaction) -> None:
        tx.put_tensors("model", inference_state(model), task=task.index)

    def load_task(self, task: TaskInfo, store: ArtifactStore) -> nn.Module:
        model = archs.build(self.ctx.arch, task.num_classes)
        return load_inference_state(model, store.get_tensors("model", task.index))

    @classmethod
    def memory_formula(cls, arch: str, num_classes: list[int],
                       options: dict[str, Any]) -> Breakdown:
        per_task = []
        for c in num_classes:
            n = sum(v.numel() for v in inference_state(archs.build(arch, c)).values())
            per_task.append({"model": n * FLOAT32})
        return Breakdown(shared={}, per_task=per_task)
