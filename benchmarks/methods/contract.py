"""The method contract: what a continual-learning method must provide to the harness.

The harness owns the loop, optimiser, schedule, AMP, seeds, progress and resume; a method
owns only what makes it different. One rule makes resume exact: **a method keeps no state
across tasks except through the artifact store**. ``model_for_task(t)`` may read what tasks
< t stored (NWS's previous indices, PackNet's backbone and owner ids), nothing else.

A new method is one module with one :class:`Method` subclass plus one line in
:mod:`benchmarks.methods.table`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from benchmarks.core.breakdown import Breakdown
from benchmarks.core.protocols import Protocol, S
from benchmarks.core.store import ArtifactStore, Transaction

# What analysis may read from a method's store, through Method.analysis_hooks only:
ANALYSIS_HOOKS: dict[str, str] = {
    "task_indices": "(store, task) -> {layer: int array}: the pool indices of a task (NWS)",
    "pool_size": "(store) -> int, or an int: the pool size the indices point into (NWS)",
    "task_codes": "(store, task) -> {layer: int array}: the quantised codes of a task (AQD)",
}


@dataclass(frozen=True)
class TaskInfo:
    index: int
    name: str
    num_classes: int


@dataclass
class MethodContext:
    """Everything a method may know about the run."""

    arch: str
    benchmark: str
    tasks: tuple[TaskInfo, ...]
    protocol: Protocol
    device: torch.device
    seed: int
    pretrained: Any  # benchmarks.models.archs.Pretrained
    options: dict[str, Any] = field(default_factory=dict)
    # How the run uses its device (benchmarks.core.device_policy.DevicePolicy); None outside the
    # harness: a method then asks DevicePolicy.for_device(device).
    policy: Any = None


# fit(model, protocol, phase) trains ``model`` on the current task's data with the harness
# loop; methods call it from finish_task for extra phases (PackNet's retraining).
Fit = Callable[[nn.Module, Protocol, str], None]


class Method(ABC):
    name: ClassVar[str]
    # Method-specific settings with their source; a dict per benchmark overrides "default".
    SETTINGS: ClassVar[dict[str, dict[str, S]]] = {"default": {}}
    # False when the method applies weight decay itself (PackNet).
    optimizer_weight_decay: ClassVar[bool] = True
    # The DevicePolicy fields whose choice can change this method's results: they join the
    # run identity, so a resume under another choice is refused (NWS: the search path).
    policy_fields: ClassVar[tuple[str, ...]] = ()
    # The version of the method's rules: bumped when a default's *behaviour* changes (e.g. a
    # reference rule becomes the default), so runs of the old rules are never resumed into
    # (docs/reproducibility.md, Run identity). An option added with a default that keeps
    # the old behaviour needs no bump: it changes no run id.
    rule_version: ClassVar[int] = 1
    # Names of the per-epoch figures :meth:`epoch_figures` returns (columns of epochs.csv).
    EPOCH_FIGURES: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.opt = ctx.options

    # -- settings ------------------------------------------------------------------------
    @classmethod
    def settings(cls, benchmark: str) -> dict[str, S]:
        return dict(cls.SETTINGS.get("default", {})) | dict(cls.SETTINGS.get(benchmark, {}))

    @classmethod
    def resolve_options(cls, benchmark: str, overrides: dict[str, Any]) -> dict[str, Any]:
        """The defaults with ``overrides``, each checked against its option's range
        (``ValueError`` naming the value and the range), then :meth:`check_options`."""
        known = cls.settings(benchmark)
        unknown = set(overrides) - set(known)
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} for method {cls.name}; "
                f"valid: {sorted(known) or 'none'}"
            )
        options = {k: s.value for k, s in known.items()} | dict(overrides)
        for key, value in overrides.items():
            if known[key].check is not None:
                known[key].check.check(f"--opt {key}", value)
        cls.check_options(options)
        return options

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Checks across options or of their inputs' contents (``ValueError``), run with
        the ranges before any work; each option's own range is its ``S.check``."""

    def adjust_protocol(self, protocol: Protocol) -> Protocol:
        """A method may change the protocol (e.g. its own quick setting); say so in provenance."""
        return protocol

    # -- training ------------------------------------------------------------------------
    @abstractmethod
    def model_for_task(self, task: TaskInfo, store: ArtifactStore) -> nn.Module:
        """The model to train on ``task`` (global RNG is seeded from the init stream)."""

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module) -> None:
        """Called after every backward pass, before the optimiser step."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step."""

    def finish_task(self, task: TaskInfo, model: nn.Module, fit: Fit) -> None:
        """Called once after the main training (prune + retrain, freezing, ...)."""

    def epoch_state(self, model: nn.Module) -> Any:
        """Called after each training epoch's first step (device ops only, no host read);
        handed to :meth:`epoch_figures` after the epoch."""
        return None

    def epoch_figures(self, model: nn.Module, state: Any) -> dict[str, torch.Tensor]:
        """Per-epoch figures named in :attr:`EPOCH_FIGURES`, as 0-d tensors on the device
        (read once with the epoch's loss; never read them here). Only those it has."""
        return {}

    # -- storage -------------------------------------------------------------------------
    @abstractmethod
    def save_task(self, task: TaskInfo, model: nn.Module, tx: Transaction) -> None:
        """Put everything task ``task`` needs at inference (and shared state) in ``tx``."""

    @abstractmethod
    def load_task(self, task: TaskInfo, store: ArtifactStore) -> nn.Module:
        """Rebuild task ``task``'s inference model from the store alone."""

    def task_metrics(self, task: TaskInfo, store: ArtifactStore) -> dict[str, float]:
        """Extra per-task measurements from the store (written as result rows)."""
        return {}

    @classmethod
    def analysis_hooks(cls) -> dict[str, Callable[..., Any] | int]:
        """This method's readers of its own store for the analyses, by name (keys of
        :data:`ANALYSIS_HOOKS`); none by default. Analysis finds them here only, so renaming
        a method's function breaks this declaration loudly instead of dropping its runs."""
        return {}

    @classmethod
    @abstractmethod
    def memory_formula(
        cls, arch: str, num_classes: list[int], options: dict[str, Any]
    ) -> Breakdown:
        """Analytic stored bytes, by component; tests hold it equal to the store's bytes."""
