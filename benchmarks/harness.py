"""The shared harness: one (method, seed) run over a benchmark's tasks, resumable.

For each task t: build the model (init stream seeded), train, ``finish_task``, save to the
artifact store in one transaction, then rebuild every task j <= t from the store alone and
evaluate it (row R[t][j] of the accuracy matrix). A run killed at any point and restarted
with the same command continues after its last committed task; a task committed to the
store but not yet evaluated is evaluated, not retrained; a task killed while training
continues after its last finished epoch (``checkpoints/`` in the run folder, one file per
training phase, deleted once the task is in the store).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.archs import Pretrained
from benchmarks.data import BENCHMARKS, Benchmark
from benchmarks.device_policy import resolve_device
from benchmarks.lock import RunLock
from benchmarks.method import Method, MethodContext, TaskInfo
from benchmarks.methods import METHODS
from benchmarks.protocols import Protocol, resolve_protocol
from benchmarks.results import ResultsStore
from benchmarks.seeding import seed_global, set_deterministic
from benchmarks.store import ArtifactStore
from benchmarks.training import FitStats, evaluate, fit

log = logging.getLogger("benchmarks")
MIB = 2**20


class RunConflictError(RuntimeError):
    """The run folder holds a run with another configuration."""


@dataclass
class RunConfig:
    method: str
    benchmark: str = "split_digits"
    arch: str = "resnet18"
    protocol: str = "quick"
    seed: int = 1993
    data_root: str | None = None
    out: str = "results/runs"
    pretrained: str | None = None  # None: the benchmark's default
    num_tasks: int | None = None
    device: str = "auto"
    deterministic: bool = False
    num_workers: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)
    protocol_overrides: dict[str, Any] = field(default_factory=dict)
    benchmark_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


def build_benchmark(cfg: RunConfig) -> Benchmark:
    from benchmarks.data import default_data_root

    root = Path(cfg.data_root).expanduser().resolve() if cfg.data_root else default_data_root()
    bench = BENCHMARKS.get(cfg.benchmark)(root, **cfg.benchmark_options)
    return bench.subset(cfg.num_tasks)


def environment(device: torch.device, deterministic: bool) -> dict[str, Any]:
    import numpy
    import pandas
    import timm
    import torchvision

    try:
        repo = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", False
    return {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "timm": timm.__version__, "numpy": numpy.__version__, "pandas": pandas.__version__,
        "git_commit": commit, "git_dirty": dirty, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), "deterministic": deterministic,
    }


def run_identity(cfg: RunConfig, protocol: Protocol, options: dict[str, Any],
                 pretrained: str) -> dict[str, Any]:
    """What must match for a run folder to be resumed."""
    proto = protocol.as_dict()
    proto.pop("provenance")
    return {
        "method": cfg.method, "benchmark": cfg.benchmark, "arch": cfg.arch, "seed": cfg.seed,
        "protocol": proto, "options": options, "pretrained": pretrained,
        "num_tasks": cfg.num_tasks, "benchmark_options": cfg.benchmark_options,
        "deterministic": cfg.deterministic,
    }


def run_id(cfg: RunConfig, identity: dict[str, Any]) -> str:
    base = f"{cfg.benchmark}-{cfg.method}-{cfg.arch}-{cfg.protocol}-s{cfg.seed}"
    variant = {k: identity[k] for k in ("options", "pretrained", "num_tasks", "benchmark_options")}
    variant["protocol_overrides"] = cfg.protocol_overrides
    digest = hashlib.sha256(json.dumps(variant, sort_keys=True, default=str).encode()).hexdigest()
    return f"{base}-{digest[:8]}"


def run(cfg: RunConfig, bench: Benchmark | None = None) -> Path:
    """Run (or resume) one method with one seed; returns the run folder. The folder's lock is
    held throughout (:class:`~benchmarks.lock.RunLockedError` if another process holds it)."""
    set_deterministic(cfg.deterministic)
    device = resolve_device(cfg.device)
    bench = bench if bench is not None else build_benchmark(cfg)
    method_cls: type[Method] = METHODS.get(cfg.method)
    options = method_cls.resolve_options(cfg.benchmark, cfg.method_options)
    pretrained_source = cfg.pretrained or bench.default_pretrained
    pretrained = Pretrained(cfg.arch, pretrained_source, seed=cfg.seed)
    tasks = tuple(TaskInfo(t.index, t.name, t.num_classes) for t in bench.tasks)
    protocol = resolve_protocol(cfg.protocol, cfg.benchmark)
    if cfg.protocol_overrides:
        protocol = protocol.with_overrides(**cfg.protocol_overrides)
    ctx = MethodContext(cfg.arch, cfg.benchmark, tasks, protocol, device, cfg.seed,
                        pretrained, options)
    method = method_cls(ctx)
    protocol = method.adjust_protocol(protocol)
    ctx.protocol = protocol

    identity = run_identity(cfg, protocol, options, pretrained_source)
    rid = run_id(cfg, identity)
    results = ResultsStore(Path(cfg.out).expanduser().resolve() / rid)
    with RunLock(results.dir):  # one writer per run folder, for the run's life
        return _run_locked(cfg, bench, method, method_cls, options, protocol, identity, rid,
                           results, device, tasks)


def _run_locked(cfg: RunConfig, bench: Benchmark, method: Method, method_cls: type[Method],
                options: dict[str, Any], protocol: Protocol, identity: dict[str, Any], rid: str,
                results: ResultsStore, device: torch.device, tasks: tuple[TaskInfo, ...]) -> Path:
    previous = results.read_json("config.json")
    if previous is not None and previous["identity"] != json.loads(json.dumps(identity,
                                                                                default=str)):
        raise RunConflictError(
            f"{results.dir} holds a run with another configuration; choose another --out, or "
            f"delete that folder to start over"
        )
    results.write_json("config.json", {
        "identity": identity, "run_id": rid, "protocol_provenance": protocol.provenance,
        "option_provenance": {k: s.source for k, s in method_cls.settings(cfg.benchmark).items()},
        "synthetic": bench.synthetic, "benchmark_notes": bench.notes,
        "tasks": [asdict(t) for t in tasks], "run_config": asdict(cfg),
    })
    results.write_json("env.json", environment(device, cfg.deterministic))
    store = ArtifactStore(results.dir / "artifacts")

    base_row = {"run_id": rid, "benchmark": cfg.benchmark, "method": cfg.method,
                "arch": cfg.arch, "protocol": cfg.protocol, "seed": cfg.seed,
                "synthetic": bench.synthetic}
    finished = results.finished_tasks()
    tag = f"[{cfg.method} s{cfg.seed}]"
    started, done_here = time.perf_counter(), 0
    for task, info in zip(bench.tasks, tasks, strict=True):
        t = info.index
        if t in finished:
            continue
        checkpoints = results.dir / "checkpoints"
        if not store.has_task(t):
            _learn_task(method, info, task, store, cfg, device, protocol,
                        desc=f"{tag} task {t + 1}/{len(tasks)} {info.name}",
                        checkpoints=checkpoints)
        else:
            log.info("%s task %d is in the store but not evaluated: evaluating", tag, t)
        # The task is in the store: its phases' checkpoints are not needed now (also those a
        # kill between the commit and this line left behind).
        for done in checkpoints.glob(f"{_checkpoint_prefix(t)}*"):
            done.unlink()
        rows = _evaluate_after(method, bench, tasks, t, store, device, protocol, cfg)
        meta = store.task_meta(t)
        measured = {m: meta.get(m) for m in ("train_seconds", "train_steps", "final_train_loss")}
        measured |= method.task_metrics(info, store)
        measured |= {"task_bytes": store.nbytes(t), "shared_bytes": store.nbytes(None),
                     "store_bytes": store.total_bytes()}
        rows += [{"task": t, "task_name": info.name, "after_task": t, "metric": m, "value": v}
                 for m, v in measured.items()]
        # The task's own accuracy row goes last: its presence marks the task finished.
        rows.sort(key=lambda r: r["metric"] == "accuracy" and r["task"] == t)
        results.append([base_row | r for r in rows])
        own = next(r["value"] for r in rows if r["metric"] == "accuracy" and r["task"] == t)
        mean = sum(r["value"] for r in rows if r["metric"] == "accuracy") / (t + 1)
        done_here += 1
        left = len(tasks) - t - 1
        eta = (time.perf_counter() - started) / done_here * left
        print(f"{tag} task {t + 1}/{len(tasks)} {info.name}: acc {own:.1%} | mean over "
              f"{t + 1} {mean:.1%} | stored {store.total_bytes() / MIB:.2f} MiB | "
              f"{meta.get('train_seconds', float('nan')):.1f} s"
              + (f" | {left} left, ETA {_clock(eta)}" if left else ""), flush=True)
    return results.dir


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _checkpoint_prefix(task: int) -> str:
    """File name prefix of a task's phase checkpoints (``task003-1-retrain.pt``)."""
    return f"task{task:03d}-"


def _learn_task(method: Method, info: TaskInfo, task, store: ArtifactStore, cfg: RunConfig,
                device: torch.device, protocol: Protocol, desc: str,
                checkpoints: Path) -> None:
    """Train task ``info`` and commit it to the store. Each training phase checkpoints after
    every epoch; a resumed task replays its phases in order, and what a method does between
    them (PackNet's pruning, NWS's k-means pools) runs again on the restored weights and
    RNG state, so it repeats exactly."""
    seed_global(cfg.seed, info.index, "init")
    model = method.model_for_task(info, store).to(device)
    stats = FitStats()
    calls = itertools.count()
    prefix = _checkpoint_prefix(info.index)

    def phase_fit(m: torch.nn.Module, proto: Protocol, phase: str) -> None:
        fit(m, method, proto, task.train, device=device, seed=cfg.seed, task=info.index,
            phase=phase, num_workers=cfg.num_workers, progress=cfg.progress,
            desc=f"{desc} [{phase}]", stats=stats,
            checkpoint=checkpoints / f"{prefix}{next(calls)}-{phase}.pt")

    phase_fit(model, protocol, "train")
    method.finish_task(info, model, phase_fit)
    model.eval()
    with store.transaction() as tx:
        method.save_task(info, model, tx)
        tx.set_task_meta(info.index, {"train_seconds": round(stats.seconds, 3),
                                      "train_steps": stats.steps,
                                      "final_train_loss": stats.final_loss})


def _evaluate_after(method: Method, bench: Benchmark, tasks: tuple[TaskInfo, ...], t: int,
                    store: ArtifactStore, device: torch.device, protocol: Protocol,
                    cfg: RunConfig) -> list[dict[str, Any]]:
    rows = []
    for j in range(t + 1):
        model = method.load_task(tasks[j], store)
        acc = evaluate(model, bench.tasks[j].test, device=device,
                       batch_size=protocol.eval_batch_size, amp=protocol.amp,
                       num_workers=cfg.num_workers)
        rows.append({"task": j, "task_name": tasks[j].name, "after_task": t,
                     "metric": "accuracy", "value": acc})
    return rows
