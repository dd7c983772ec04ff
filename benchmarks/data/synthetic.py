"""Synthetic tasks for tests: class templates plus noise. Used only when asked for by name;
every result row of a run on it carries ``synthetic=True``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch

from benchmarks.core.checks import Range
from benchmarks.data.base import Benchmark, Task, TensorImages

# --bench-opt ranges (benchmarks.core.checks): a test set is small; memory grows with all of them
_COUNT = Range(1, 100_000, "images per task: at least one; 100,000 is past any test's need",
               integer=True)


def build(
    data_root: Path | None = None,
    num_tasks: Annotated[int, Range(1, 100, "tasks: at least one", integer=True)] = 3,
    num_classes: Annotated[int, Range(2, 1000, "a task tells classes apart: two at least",
                                      integer=True)] = 2,
    n_train: Annotated[int, _COUNT] = 32,
    n_test: Annotated[int, _COUNT] = 16,
    size: Annotated[int, Range(8, 512, "pixels per side: the archs need 8 at least; 512 "
                               "is past any test's need", integer=True)] = 32,
) -> Benchmark:
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(num_tasks):
        templates = torch.rand(num_classes, 3, size, size, generator=g)

        def sample(n: int, templates: torch.Tensor = templates) -> tuple[torch.Tensor, ...]:
            y = torch.arange(n) % num_classes
            x = templates[y] * 0.7 + 0.3 * torch.rand(n, 3, size, size, generator=g)
            return (x * 255).round().to(torch.uint8), y

        tasks.append(
            Task(
                t, f"synthetic_{t}", [f"c{c}" for c in range(num_classes)],
                TensorImages(*sample(n_train)), TensorImages(*sample(n_test)),
            )
        )
    return Benchmark("synthetic", tasks, synthetic=True, default_pretrained="none",
                     input_size=size, notes="generated; not a benchmark")
