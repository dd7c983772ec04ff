"""Aten ops and host-sync-prone ops per steady-state training step, per method.

    python -m benchmarks.profile --method all
    python -m benchmarks.profile --method nws,packnet --arch resnet18 --batch 32 --size 32
    python -m benchmarks.profile --compile-counts       # torch.compile: graphs, breaks

On a GPU every aten op is a kernel launch (~5-10 us of host time) and a sync-prone op stalls
the host until the device has caught up (:mod:`benchmarks.perf.opcount`), so these counts, taken
on CPU, predict how host-bound a method's GPU step is without a GPU. Each method is built
through the suite's registries (method, architecture, protocol) exactly as the harness
builds it, with a randomly initialised backbone, and stepped on synthetic CIFAR-shaped
tensors: profiling needs no data set. The counted step is ``Trainer.step`` after
``--warmup`` steps (the first steps initialise lazily: AQD's activation scales, NWS's first
full search). NWS runs the search path ``--search`` (default ``full``: the path CUDA takes)
with its compiled CPU kernels off (they never run on CUDA), i.e. the CUDA code path.

Columns: every aten op dispatched (the issue's measure), the same without view/alias ops
(``view``, ``detach``, ``select``, ...: host-side metadata, no device work), each as a ratio
to the plain (Finetune) step, and the sync-prone ops. Kernels a single fused aten op launches
inside (``convolution_backward``, a foreach op's chunks) are not seen at this level.
Targets (issue 13): 0 sync-prone ops per step for every method, and ops per step <= 2x the
plain step. The exit status is 0 either way: this reports, it does not judge.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.core.device_policy import SEARCH_ENV, SEARCH_PATHS, DevicePolicy
from benchmarks.core.protocols import resolve_protocol
from benchmarks.core.store import ArtifactStore
from benchmarks.engine.training import Trainer, compile_model
from benchmarks.methods.contract import Method, MethodContext, TaskInfo
from benchmarks.methods.table import METHODS
from benchmarks.models.archs import ARCHS, Pretrained
from benchmarks.perf.opcount import OpCounter

PLAIN = "finetune"
CLASSES = 10
BENCHMARK = "split_cifar100"  # whose method settings and paper protocol the step uses
# k-means for NWS's pools is setup, not profiled: a coarse fit keeps it short.
NWS_OPTIONS = {"pools": "kmeans-pretrained", "kmeans_iters": 2, "kmeans_points": 2048}
PHASES = ("first", "later")


@dataclass
class StepProfile:
    """One method's counts over one steady-state step."""

    method: str
    ops: int
    syncs: int
    sync_ops: dict[str, int] = field(default_factory=dict)
    compute: int = 0  # ops that do device work: not views, aliases or profiler markers
    ratio: float | None = None  # ops / the plain step's ops
    compute_ratio: float | None = None  # compute / the plain step's compute


def _overload(name: str) -> Any:
    """``"aten.view.default"`` -> ``torch.ops.aten.view.default`` (None if unknown)."""
    obj: Any = torch.ops
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def compute_ops(counts: dict[str, int]) -> int:
    """Ops among ``counts`` that launch device work: view/alias ops (``view``, ``detach``,
    ``select``, ``split``, ...) only make tensor metadata on the host, and profiler markers
    launch nothing."""
    total = 0
    for name, n in counts.items():
        op = _overload(name)
        if name.startswith("profiler.") or (op is not None and getattr(op, "is_view", False)):
            continue
        total += n
    return total


@contextlib.contextmanager
def cuda_code_path(search: str) -> Iterator[None]:
    """Environment of the CUDA code path on any device: NWS's search forced to ``search``,
    NWS's compiled CPU kernels off (also when this process built them already). Restores
    the previous environment."""
    if search not in SEARCH_PATHS:
        raise ValueError(f"search {search!r}; valid: {', '.join(SEARCH_PATHS)}")
    from nws import cpu_kernels

    saved = {k: os.environ.get(k) for k in (SEARCH_ENV, "NWS_CPU_KERNELS")}
    loaded = dict(cpu_kernels._loaded)  # kernels built earlier in this process stay unused
    os.environ[SEARCH_ENV], os.environ["NWS_CPU_KERNELS"] = search, "0"
    cpu_kernels._loaded["module"] = None
    try:
        yield
    finally:
        cpu_kernels._loaded.clear()
        cpu_kernels._loaded.update(loaded)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build_method(name: str, arch: str = "resnet18", device: torch.device | None = None,
                 protocol: str = "paper", num_tasks: int = 2,
                 options: dict[str, Any] | None = None,
                 overrides: dict[str, Any] | None = None) -> Method:
    """``name`` from the method registry, for ``num_tasks`` tasks of ``CLASSES`` classes,
    under ``protocol`` of Split-CIFAR-100 (``overrides``: protocol fields, e.g. ``amp``),
    from a random init (no weights needed). ``options``: method options over the defaults
    (NWS: ``NWS_OPTIONS`` under them)."""
    device = device or torch.device("cpu")
    cls = METHODS.get(name)
    tasks = tuple(TaskInfo(t, f"t{t}", CLASSES) for t in range(num_tasks))
    proto = resolve_protocol(protocol, BENCHMARK)
    if overrides:
        proto = proto.with_overrides(**overrides)
    options = (NWS_OPTIONS if name == "nws" else {}) | (options or {})
    options = cls.resolve_options(BENCHMARK, options)
    ctx = MethodContext(arch, BENCHMARK, tasks, proto, device, 0, Pretrained(arch, "none"),
                        options)
    method = cls(ctx)
    ctx.protocol = method.adjust_protocol(proto)
    return method


def build_trainer(method: Method, store_dir: Path, phase: str = "first",
                  compile: bool = False) -> Trainer:
    """A ``Trainer`` on the method's model for task 0 (``phase="first"``) or for task 1
    after task 0 was finished (no training) and stored (``"later"``)."""
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}; valid: {', '.join(PHASES)}")
    ctx = method.ctx
    store = ArtifactStore(store_dir)
    model = method.model_for_task(ctx.tasks[0], store)
    if phase == "later":
        model.to(ctx.device).train()
        method.finish_task(ctx.tasks[0], model, lambda *_: None)  # no retraining
        with store.transaction() as tx:
            method.save_task(ctx.tasks[0], model, tx)
        model = method.model_for_task(ctx.tasks[1], store)
    DevicePolicy.for_device(ctx.device, amp=ctx.protocol.amp).apply()  # as a run does
    return Trainer(model.to(ctx.device).train(), method, ctx.protocol, ctx.device,
                   compile=compile)


def synthetic_batch(batch: int, size: int, device: torch.device, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped inputs: ``(batch, 3, size, size)`` normal floats, labels in 0..9."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, CLASSES, (batch,), generator=g)
    return x.to(device), y.to(device)


def count_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor, warmup: int = 3
               ) -> OpCounter:
    """Run ``warmup`` steps, then count the ops of one more."""
    for _ in range(warmup):
        trainer.step(x, y)
    with OpCounter() as ops:
        trainer.step(x, y)
    return ops


def profile_method(name: str, *, arch: str = "resnet18", batch: int = 32, size: int = 32,
                   search: str = "full", phase: str = "first", warmup: int = 3,
                   device: torch.device | None = None) -> StepProfile:
    """Counts of one steady-state step of ``name`` on the CUDA code path."""
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    with cuda_code_path(search), tempfile.TemporaryDirectory() as tmp:
        method = build_method(name, arch, device)
        trainer = build_trainer(method, Path(tmp), phase)
        ops = count_step(trainer, *synthetic_batch(batch, size, device), warmup=warmup)
    return StepProfile(name, ops.total, ops.syncs, ops.sync_ops, compute_ops(ops.counts))


@dataclass
class CompileCounts:
    """What ``torch.compile`` (dynamo) made of one method's training steps: graphs captured,
    graph breaks, compiles after the first (recompiles), and each break's reason."""

    method: str
    graphs: int
    breaks: int
    recompiles: int
    shapes: int  # batch shapes stepped (each may add one compile)
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def whole(self) -> bool:
        """Each step captured whole: no break, at most one graph and compile per shape."""
        return self.breaks == 0 and self.graphs <= self.shapes and \
            self.recompiles <= self.shapes - 1


def count_compile(name: str, *, arch: str = "resnet18", batch: int = 32, size: int = 32,
                  search: str = "full", steps: int = 3,
                  options: dict[str, Any] | None = None) -> CompileCounts:
    """Dynamo's counts over ``steps`` training steps of ``name``, one step of a short last
    batch (``batch - 1``: a second shape) and one more full step, on the CUDA code path.

    The model's call (its forward hooks with it) is compiled as the Trainer compiles it
    (:func:`benchmarks.engine.training.compile_model`), with the ``eager`` backend: graphs,
    breaks and
    recompiles are decided by dynamo before any backend runs (the same for inductor on CPU
    and CUDA graphs on a GPU), and nothing is code-generated, so counting is quick. On a GPU
    each break ends a CUDA graph and each recompile records another."""
    from torch._dynamo.utils import counters, guard_failures

    torch._dynamo.reset()
    counters.clear()
    guard_failures.clear()
    torch.manual_seed(0)
    with cuda_code_path(search), tempfile.TemporaryDirectory() as tmp:
        method = build_method(name, arch, options=options)
        trainer = build_trainer(method, Path(tmp))
        trainer.forward = compile_model(trainer.model, backend="eager")
        x, y = synthetic_batch(batch, size, method.ctx.device)
        for _ in range(steps):
            trainer.step(x, y)
        trainer.step(x[:-1], y[:-1])
        trainer.step(x, y)
    reasons: dict[str, int] = {}
    for reason, n in counters["graph_break"].items():
        key = str(reason).strip().splitlines()[0][:120]
        reasons[key] = reasons.get(key, 0) + n
    recompiles = sum(len(failed) for failed in guard_failures.values())  # a failed guard:
    counts = CompileCounts(name, counters["stats"]["unique_graphs"],  # a frame compiled again
                           sum(reasons.values()), recompiles, 2, reasons)
    torch._dynamo.reset()
    return counts


def format_compile_table(rows: Sequence[CompileCounts]) -> str:
    lines = [f"{'method':<10} {'graphs':>6} {'breaks':>6} {'recompiles':>10}  whole  "
             f"most frequent break"]
    for r in rows:
        top = max(r.reasons.items(), key=lambda kv: kv[1], default=("-", 0))
        lines.append(f"{r.method:<10} {r.graphs:>6} {r.breaks:>6} {r.recompiles:>10}  "
                     f"{'yes' if r.whole else 'no':<5}  "
                     + (f"{top[1]}x {top[0]}" if top[1] else "-"))
    return "\n".join(lines)


def profile(methods: Sequence[str], **kwargs) -> list[StepProfile]:
    """:func:`profile_method` for the plain step and each of ``methods``; ratios to plain."""
    plain = profile_method(PLAIN, **kwargs)
    rows = [plain if m == PLAIN else profile_method(m, **kwargs) for m in methods]
    for row in rows:
        row.ratio = row.ops / plain.ops
        row.compute_ratio = row.compute / plain.compute
    return rows


def format_table(rows: Sequence[StepProfile]) -> str:
    lines = [f"{'method':<10} {'aten ops':>9} {'x plain':>8} {'non-view':>9} {'x plain':>8} "
             f"{'syncs':>6}  sync-prone ops"]
    for r in rows:
        names = ", ".join(f"{k} x{v}" for k, v in sorted(r.sync_ops.items())) or "-"
        lines.append(f"{r.method:<10} {r.ops:>9} {r.ratio or 0:>8.2f} {r.compute:>9} "
                     f"{r.compute_ratio or 0:>8.2f} {r.syncs:>6}  {names}")
    return "\n".join(lines)


def parse_methods(spec: str) -> list[str]:
    names = METHODS.names() if spec == "all" else [m.strip() for m in spec.split(",") if m]
    for name in names:
        METHODS.get(name)  # an unknown name stops with the valid ones
    return names


STEP_FLOORS = {"batch": 2, "size": 1, "warmup": 1}
"""Least values of the step-size flags: BatchNorm cannot train on one image; the first step
creates the optimiser state and the methods' cached index tensors (not a steady state)."""


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     floors: dict[str, int]) -> None:
    """Exit 2 naming the first flag of ``floors`` (argument name -> least value) below it."""
    for name, least in floors.items():
        value = getattr(args, name)
        if value < least:
            flag = "--" + name.replace("_", "-")
            parser.exit(2, f"{parser.prog}: error: {flag} {value}: give {least} or more\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0],
        epilog="Runs on synthetic CIFAR-shaped tensors from a random init: no data set or "
               "weights are needed. Counts are of the CUDA code path, taken on CPU.")
    parser.add_argument("--method", default="all", help="a,b,... or 'all' (registry names)")
    parser.add_argument("--arch", default="resnet18", help=f"one of {ARCHS.names()}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--search", choices=SEARCH_PATHS, default="full",
                        help="NWS search path (full: the CUDA default)")
    parser.add_argument("--phase", choices=PHASES, default="first",
                        help="task 0, or task 1 after a stored task 0 (NWS: W on pool entries)")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted steps before")
    parser.add_argument("--compile-counts", action="store_true",
                        help="instead: torch.compile's graphs, graph breaks and recompiles "
                             "per method over --warmup steps, a short batch and one more "
                             "step (dynamo's decisions; eager backend, nothing compiled)")
    args = parser.parse_args(argv)
    try:
        methods = parse_methods(args.method)
        ARCHS.get(args.arch)
    except (KeyError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err.args[0] if err.args else err}\n")
    require_at_least(parser, args, STEP_FLOORS)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    if args.compile_counts:
        print(f"# {args.arch}, batch {args.batch} (then {args.batch - 1}), {args.size}x"
              f"{args.size}, NWS search {args.search}; torch.compile of the model's call "
              "(hooks included)")
        print(format_compile_table([
            count_compile(m, arch=args.arch, batch=args.batch, size=args.size,
                          search=args.search, steps=args.warmup) for m in methods]))
        return 0
    rows = profile(methods, arch=args.arch, batch=args.batch, size=args.size,
                   search=args.search, phase=args.phase, warmup=args.warmup)
    print(f"# {args.arch}, batch {args.batch}, {args.size}x{args.size}, phase {args.phase}, "
          f"NWS search {args.search}; one Trainer.step after {args.warmup} warm-up steps")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
