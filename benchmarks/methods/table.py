"""The method registry: name -> Method class (imported lazily)."""

from __future__ import annotations

from benchmarks.core.registry import Registry

METHODS: Registry[type] = Registry("method")
METHODS.register(
    "finetune", "baselines.finetune:Finetune",
    "ImageNet ResNet, new head per task, everything trained, one full model per task",
)
METHODS.register(
    "nws", "benchmarks.methods.nws_method:NWSMethod",
    "Neural Weight Search: frozen layer-wise kernel pools, tasks stored as pool indices",
)
METHODS.register(
    "ksm", "baselines.ksm:KSM",
    "kernel-wise soft mask over a frozen ImageNet backbone",
)
METHODS.register(
    "packnet", "baselines.packnet:PackNet",
    "one shared backbone, owner id per weight, prune + retrain per task",
)
METHODS.register(
    "aqd", "baselines.aqd:AQD",
    "AQD-style 2-bit weight/activation quantisation-aware finetuning per task",
)
