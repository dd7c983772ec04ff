"""Benchmarks (task sequences) by name; see :mod:`benchmarks.data.base` for the types."""

from __future__ import annotations

import inspect
import typing
from typing import Any

from benchmarks.core.checks import Check
from benchmarks.core.registry import Registry
from benchmarks.data.base import Benchmark, DataUnavailableError, Task, default_data_root


def _check_builder(obj: object) -> None:
    """A plugin benchmark is a builder ``(root, **options) -> Benchmark`` (TypeError else)."""
    if not callable(obj):
        raise TypeError(f"{type(obj).__name__} is not callable: a benchmark is a builder "
                        f"(root, **options) -> benchmarks.data.base.Benchmark")


BENCHMARKS: Registry = Registry("benchmark", group="nws_bench.benchmarks",
                                validate=_check_builder)
BENCHMARKS.register(
    "split_digits", "benchmarks.data.split_digits:build",
    "scikit-learn's bundled digits, 5 two-class tasks at 32x32x3 (offline; the default)",
)
BENCHMARKS.register(
    "split_cifar100", "benchmarks.data.split_cifar100:build",
    "CIFAR-100, 20 five-class tasks by superclass (docs/reference.md §3)",
)
BENCHMARKS.register(
    "cub_to_sketches", "benchmarks.data.cub_to_sketches:build",
    "CUB-200 -> Cars -> Flowers -> WikiArt -> Sketches, ImageFolder trees (docs/reference.md §3)",
)
BENCHMARKS.register(
    "synthetic", "benchmarks.data.synthetic:build",
    "generated images for tests; results are marked synthetic",
)


def benchmark_option_names(name: str) -> list[str]:
    """The ``--bench-opt`` keys benchmark ``name``'s builder takes (its keyword parameters
    after the data root)."""
    params = list(inspect.signature(BENCHMARKS.get(name)).parameters.values())[1:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_benchmark_options(name: str, options: dict[str, Any]) -> None:
    """Raise ``ValueError`` (CLI exit 2) naming the valid keys when ``options`` holds a key
    benchmark ``name`` does not take, or naming the range when a value is outside the one
    its builder's parameter declares (``Annotated[int, Range(...)]``); before any job is
    planned or data is read."""
    valid = benchmark_option_names(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown --bench-opt key(s) {', '.join(unknown)} for benchmark {name}; valid: "
            f"{', '.join(valid) or 'none (it takes no options)'}")
    hints = typing.get_type_hints(BENCHMARKS.get(name), include_extras=True)
    for key, value in options.items():  # the ranges declared with the builder's parameters
        for rule in getattr(hints.get(key), "__metadata__", ()):
            if isinstance(rule, Check):
                rule.check(f"--bench-opt {key}", value)


__all__ = ["BENCHMARKS", "Benchmark", "DataUnavailableError", "Task", "benchmark_option_names",
           "check_benchmark_options", "default_data_root"]
