"""Bytes by component (shared once, and per task): what a memory formula returns and what an
artifact store holds (:meth:`benchmarks.core.store.ArtifactStore.breakdown`), so the two compare
with ``==``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Breakdown:
    """Analytic bytes by component: shared once, and per task."""

    shared: dict[str, int]
    per_task: list[dict[str, int]]

    def task_bytes(self, task: int) -> int:
        return sum(self.per_task[task].values())

    def total(self) -> int:
        return sum(self.shared.values()) + sum(sum(d.values()) for d in self.per_task)

    def cumulative(self) -> list[int]:
        """Total bytes after each task is learned (shared counted from the first task)."""
        base, out = sum(self.shared.values()), []
        for d in self.per_task:
            base += sum(d.values())
            out.append(base)
        return out
