"""The method registry: name -> Method class (imported lazily); plugins by module path and
entry point (group ``nws_bench.methods``) through :mod:`benchmarks.core.registry`."""

from __future__ import annotations

import inspect
import re
from typing import Any

from benchmarks.core.registry import Registry, object_path

# A method's name makes its run folders' names and its rows' ``method`` column.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def method_name(obj: Any) -> str:
    """The ``name`` of a plugin's method class; TypeError saying why ``obj`` is none: not a
    :class:`~benchmarks.methods.contract.Method` subclass, abstract methods left, no (or
    an unusable) ``name``."""
    from benchmarks.methods.contract import Method

    if not (isinstance(obj, type) and issubclass(obj, Method)):
        what = (f"class {object_path(obj)}" if isinstance(obj, type)
                else f"an object of type {type(obj).__name__}")
        raise TypeError(f"{what} is not a subclass of benchmarks.methods.contract.Method")
    if inspect.isabstract(obj):
        raise TypeError(f"{object_path(obj)} does not implement "
                        f"{', '.join(sorted(obj.__abstractmethods__))} (abstract in Method)")
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise TypeError(f"{object_path(obj)} has no usable `name` (got {name!r}): set the class "
                        f"attribute name = \"...\" (letters, digits, _ . + -), the name its "
                        f"rows and run folders show")
    return name


METHODS: Registry[type] = Registry("method", group="nws_bench.methods", validate=method_name)
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
