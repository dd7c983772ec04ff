"""The shared harness: one (method, seed) run over a benchmark's tasks, resumable.

For each task t: build the model (init stream seeded), train, ``finish_task``, save to the
artifact store in one transaction, then rebuild every task j <= t from the store alone and
evaluate it (row R[t][j] of the accuracy matrix). A run killed at any point and restarted
with the same command continues after its last committed task; a task committed to the
store but not yet evaluated is evaluated, not retrained; a task killed while training
continues after its last saved epoch (``checkpoints/`` in the run folder or
``--checkpoint-dir``, one file per training phase, written every ``--checkpoint-every`` and
after a phase's last epoch, deleted once the task is in the store).
"""

from __future__ import annotations

import itertools
import logging
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.core.device_policy import DevicePolicy, resolve_device
from benchmarks.core.epoch_log import EpochLog
from benchmarks.core.identity import (
    RunConflictError,
    check_resumable,
    input_digests,
    resolve_input_path,
    resolve_option_paths,
    run_id,
)
from benchmarks.core.lock import RunLock
from benchmarks.core.protocols import Protocol, resolve_protocol
from benchmarks.core.results import ResultsStore
from benchmarks.core.seeding import seed_global, set_deterministic
from benchmarks.core.store import ArtifactStore
from benchmarks.data import BENCHMARKS, Benchmark, check_benchmark_options
from benchmarks.data.files import CHECK_ONLY_OPTIONS
from benchmarks.engine.checkpoints import (
    DEFAULT_CHECKPOINT_EVERY,
    CheckpointPolicy,
    adopt_checkpoints,
    checkpoint_folder,
    checkpoint_prefix,
)
from benchmarks.engine.trackers import TrackerSet
from benchmarks.engine.training import FitStats, evaluate, fit
from benchmarks.methods.contract import Method, MethodContext, TaskInfo
from benchmarks.methods.table import METHODS
from benchmarks.models.archs import Pretrained, check_input_size, no_init, unset_tensors

log = logging.getLogger("benchmarks")
MIB = 2**20


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
    # torch.compile of the training step (DevicePolicy decides the mode); not part of the
    # run's identity: the same numerics up to floating-point reordering.
    compile: bool = False
    # The NWS search path (full | certificates); None: the device's default (DevicePolicy).
    # Part of the identity of methods listing it in ``policy_fields`` (NWS): the paths can
    # differ on float32 near ties, so a resume under the other path is refused.
    search: str | None = None
    # When a training phase writes its checkpoint: epochs ("5") or a time ("10m"); the last
    # epoch of a phase always. Not part of the run's identity: it never changes results.
    checkpoint_every: str = DEFAULT_CHECKPOINT_EVERY
    # Where phase checkpoints go (e.g. node-local scratch); None: the run folder's
    # checkpoints/. Runs sharing one directory each use <dir>/<run id>/.
    checkpoint_dir: str | None = None
    # Experiment trackers (benchmarks.engine.trackers: csv, tensorboard, wandb); not part of the
    # run's identity: they only watch.
    loggers: list[str] = field(default_factory=list)


def build_benchmark(cfg: RunConfig) -> Benchmark:
    from benchmarks.data import default_data_root

    check_benchmark_options(cfg.benchmark, cfg.benchmark_options)
    root = Path(cfg.data_root).expanduser().resolve() if cfg.data_root else default_data_root()
    bench = BENCHMARKS.get(cfg.benchmark)(root, **cfg.benchmark_options)
    return bench.subset(cfg.num_tasks)


def environment(device: torch.device, deterministic: bool) -> dict[str, Any]:
    import numpy
    import pandas
    import timm
    import torchvision

    try:
        repo = Path(__file__).resolve().parent.parent.parent
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


def data_identity(benchmark_options: dict[str, Any]) -> dict[str, Any]:
    """The benchmark options that decide what the data is (not how it is checked or cached:
    ``--bench-opt verify=full`` on a rerun resumes the same run)."""
    return {k: v for k, v in benchmark_options.items() if k not in CHECK_ONLY_OPTIONS}


def run_identity(cfg: RunConfig, protocol: Protocol, options: dict[str, Any],
                 pretrained: str, device: torch.device, method_cls: type[Method]
                 ) -> dict[str, Any]:
    """What must match for a run folder to be resumed (docs/reproducibility.md, Run
    identity; compared by :func:`benchmarks.core.identity.check_resumable`).

    The device type belongs to it: a run started on CPU and resumed on CUDA (or back) would
    mix two numerics (other kernels, TF32, AMP only on CUDA) in one result without a trace,
    so such a resume is refused (:func:`check_resumable` says how to go on). The device
    index does not (a requeued job may get another GPU). It is not in the run id: the same
    command on another device type finds the folder and is told, not silently given a new
    one. The method's rule version and its input files' digests are likewise in the
    identity but not in the run id."""
    proto = protocol.as_dict()
    proto.pop("provenance")
    settings = method_cls.settings(cfg.benchmark)
    plugin = METHODS.provenance(method_cls)  # None for a built-in: its identity unchanged
    return {
        "method": method_cls.name, "benchmark": cfg.benchmark, "arch": cfg.arch,
        "seed": cfg.seed,
        "protocol": proto, "options": options, "pretrained": pretrained,
        "num_tasks": cfg.num_tasks, "benchmark_options": data_identity(cfg.benchmark_options),
        "deterministic": cfg.deterministic, "device_type": device.type,
        "rule_version": method_cls.rule_version,
        "inputs": input_digests(pretrained, settings, options),
    } | ({} if plugin is None else {"plugin": plugin})


def run(cfg: RunConfig, bench: Benchmark | None = None) -> Path:
    """Run (or resume) one method with one seed; returns the run folder. The folder's lock is
    held throughout (:class:`~benchmarks.core.lock.RunLockedError` if another process holds it)."""
    set_deterministic(cfg.deterministic)
    device = resolve_device(cfg.device)
    bench = bench if bench is not None else build_benchmark(cfg)
    check_input_size(cfg.arch, bench.input_size, cfg.benchmark)  # before any run folder
    method_cls: type[Method] = METHODS.get(cfg.method)
    settings = method_cls.settings(cfg.benchmark)
    options = method_cls.resolve_options(
        cfg.benchmark, resolve_option_paths(settings, cfg.method_options))
    pretrained_source = resolve_input_path(cfg.pretrained or bench.default_pretrained)
    pretrained = Pretrained(cfg.arch, pretrained_source, seed=cfg.seed)
    tasks = tuple(TaskInfo(t.index, t.name, t.num_classes) for t in bench.tasks)
    protocol = resolve_protocol(cfg.protocol, cfg.benchmark)
    if cfg.protocol_overrides:
        protocol = protocol.with_overrides(**cfg.protocol_overrides)
    policy = DevicePolicy.for_device(device, compile=cfg.compile, search=cfg.search,
                                     amp=protocol.amp, deterministic=cfg.deterministic)
    policy.apply()  # cuDNN autotuner, TF32
    ctx = MethodContext(cfg.arch, cfg.benchmark, tasks, protocol, device, cfg.seed,
                        pretrained, options, policy)
    method = method_cls(ctx)
    protocol = method.adjust_protocol(protocol)
    ctx.protocol = protocol

    every = CheckpointPolicy.parse(cfg.checkpoint_every)
    identity = run_identity(cfg, protocol, options, pretrained_source, device, method_cls)
    identity |= {f"policy_{k}": getattr(policy, k) for k in method_cls.policy_fields}
    defaults = {k: s.value for k, s in settings.items()}
    rid = run_id(cfg, identity, defaults)
    results = ResultsStore(Path(cfg.out).expanduser().resolve() / rid)
    trackers = TrackerSet(cfg.loggers, results.dir, rid, identity)  # checked: no folder yet
    # read only: no lock, no write (a finished run on a read-only disk reports itself done)
    if _finished(results, identity, tasks, defaults):
        print(f"[{method_cls.name} s{cfg.seed}] all {len(tasks)} tasks done in {results.dir}: "
              f"nothing to do", flush=True)
        return results.dir
    with RunLock(results.dir), trackers:  # one writer per run folder, for the run's life
        return _run_locked(cfg, bench, method, method_cls, protocol, identity, rid, results,
                           policy, every, tasks, trackers)


def _finished(results: ResultsStore, identity: dict[str, Any], tasks: tuple[TaskInfo, ...],
              option_defaults: dict[str, Any]) -> bool:
    """Whether the folder holds this very run (:func:`check_resumable`) with every task's own
    accuracy row: then there is nothing to do and nothing to write, so the run needs no lock
    (a finished run on a read-only disk reports itself done). Anything unreadable is False:
    the locked path reports it."""
    try:
        previous = results.read_json("config.json")
        if not isinstance(previous, dict) or not isinstance(previous.get("identity"), dict):
            return False
        check_resumable(results.dir, previous["identity"], identity, option_defaults)
        return {t.index for t in tasks} <= results.finished_tasks()
    except (OSError, ValueError, RunConflictError):
        return False


def _run_locked(cfg: RunConfig, bench: Benchmark, method: Method, method_cls: type[Method],
                protocol: Protocol, identity: dict[str, Any], rid: str, results: ResultsStore,
                policy: DevicePolicy, every: CheckpointPolicy, tasks: tuple[TaskInfo, ...],
                trackers: TrackerSet | None = None) -> Path:
    """The body of :func:`run`, under the run folder's lock."""
    device = policy.device
    try:
        previous = results.read_json("config.json")
        if previous is not None:
            check_resumable(results.dir, previous["identity"], identity,
                            {k: s.value for k, s in method_cls.settings(cfg.benchmark).items()})
    except (ValueError, KeyError, TypeError) as err:  # not JSON, or not a run's config
        raise RunConflictError(
            f"{results.dir / 'config.json'} is damaged ({type(err).__name__}: {err}); nothing "
            f"was changed. Restore it (e.g. from a backup), or delete that folder to start "
            f"over") from err
    checkpoints = checkpoint_folder(cfg.checkpoint_dir, rid, results.dir)
    if previous is not None:
        before = checkpoint_folder((previous.get("run_config") or {}).get("checkpoint_dir"),
                                   rid, results.dir)
        adopt_checkpoints(before, checkpoints)
    results.write_json("config.json", {
        "identity": identity, "run_id": rid, "protocol_provenance": protocol.provenance,
        "option_provenance": {k: s.source for k, s in method_cls.settings(cfg.benchmark).items()},
        "synthetic": bench.synthetic, "benchmark_notes": bench.notes,
        "tasks": [asdict(t) for t in tasks], "run_config": asdict(cfg),
    })
    results.write_json("env.json", environment(device, cfg.deterministic)
                       | {"device_policy": policy.describe()})
    store = ArtifactStore(results.dir / "artifacts")
    epochs = EpochLog(results.dir, method_cls.EPOCH_FIGURES, [trackers] if trackers else [])

    base_row = {"run_id": rid, "benchmark": cfg.benchmark, "method": method_cls.name,
                "arch": cfg.arch, "protocol": cfg.protocol, "seed": cfg.seed,
                "synthetic": bench.synthetic}
    finished = results.finished_tasks()
    tag = f"[{method_cls.name} s{cfg.seed}]"
    took: list[float] = []  # wall seconds of each task done in this launch
    for task, info in zip(bench.tasks, tasks, strict=True):
        t = info.index
        if t in finished:
            continue
        task_started = time.perf_counter()
        if not store.has_task(t):
            _learn_task(method, info, task, store, cfg, policy, protocol,
                        desc=f"{tag} task {t + 1}/{len(tasks)} {info.name}",
                        checkpoints=checkpoints, every=every, epochs=epochs)
        else:
            log.info("%s task %d is in the store but not evaluated: evaluating", tag, t)
        # The task is in the store: its phases' checkpoints are not needed now (also those a
        # kill between the commit and this line left behind).
        for done in checkpoints.glob(f"{checkpoint_prefix(t)}*"):
            done.unlink()
        rows = _evaluate_after(method, bench, tasks, t, store, policy, protocol, cfg)
        meta = store.task_meta(t)
        measured = {m: meta.get(m) for m in ("train_seconds", "train_steps", "final_train_loss")}
        measured |= method.task_metrics(info, store)
        measured |= {"task_bytes": store.nbytes(t), "shared_bytes": store.nbytes(None),
                     "store_bytes": store.total_bytes(),
                     "task_seconds": round(time.perf_counter() - task_started, 3)}
        rows += [{"task": t, "task_name": info.name, "after_task": t, "metric": m, "value": v}
                 for m, v in measured.items()]
        # The task's own accuracy row goes last: its presence marks the task finished.
        rows.sort(key=lambda r: r["metric"] == "accuracy" and r["task"] == t)
        results.append([base_row | r for r in rows])
        if trackers is not None:
            trackers.task(t, rows)
        own = next(r["value"] for r in rows if r["metric"] == "accuracy" and r["task"] == t)
        mean = sum(r["value"] for r in rows if r["metric"] == "accuracy") / (t + 1)
        took.append(time.perf_counter() - task_started)
        left = len(tasks) - t - 1
        eta = _eta(took, left)
        print(f"{tag} task {t + 1}/{len(tasks)} {info.name}: acc {own:.1%} | mean over "
              f"{t + 1} {mean:.1%} | stored {store.total_bytes() / MIB:.2f} MiB | "
              f"{meta.get('train_seconds', float('nan')):.1f} s"
              + (f" | {left} left, ETA {_clock(eta)}" if left else ""), flush=True)
    return results.dir


def _eta(took: list[float], left: int) -> float:
    """Seconds for ``left`` more tasks, from the tasks done so far in this launch. The first
    carries one-time costs (NWS's pools and CPU-kernel build, data caches): measured on the
    mini benchmark, 13.6-60 s against 7 s for NWS's later tasks, so once a later task is
    done the first is left out."""
    later = took[1:] or took
    return sum(later) / len(later) * left


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _learn_task(method: Method, info: TaskInfo, task, store: ArtifactStore, cfg: RunConfig,
                policy: DevicePolicy, protocol: Protocol, desc: str,
                checkpoints: Path, every: CheckpointPolicy, epochs: EpochLog | None = None
                ) -> None:
    """Train task ``info`` and commit it to the store. Each training phase checkpoints as
    ``every`` says and after its last epoch; a resumed task replays its phases in order, and
    what a method does between them (PackNet's pruning, NWS's k-means pools) runs again on
    the restored weights and RNG state, so it repeats exactly."""
    device = policy.device
    seed_global(cfg.seed, info.index, "init")
    model = method.model_for_task(info, store).to(device)
    stats = FitStats()
    calls = itertools.count()
    prefix = checkpoint_prefix(info.index)

    def phase_fit(m: torch.nn.Module, proto: Protocol, phase: str) -> None:
        n = next(calls)
        fit(m, method, proto, task.train, device=device, seed=cfg.seed, task=info.index,
            phase=phase, num_workers=cfg.num_workers, progress=cfg.progress,
            desc=f"{desc} [{phase}]", stats=stats,
            checkpoint=checkpoints / f"{prefix}{n}-{phase}.pt",
            checkpoint_every=every, policy=policy,
            recorder=epochs.phase(info.index, n, phase, method, m) if epochs else None)

    phase_fit(model, protocol, "train")
    method.finish_task(info, model, phase_fit)
    model.eval()
    with store.transaction() as tx:
        method.save_task(info, model, tx)
        tx.set_task_meta(info.index, {"train_seconds": round(stats.seconds, 3),
                                      "train_steps": stats.steps,
                                      "final_train_loss": stats.final_loss})


def rebuild(method: Method, task: TaskInfo, store: ArtifactStore) -> torch.nn.Module:
    """``method.load_task`` without a throwaway random init (:func:`archs.no_init`); a
    method whose rebuilt model still holds unset (NaN) tensors is an error naming them,
    never a silent wrong accuracy."""
    with no_init():
        model = method.load_task(task, store)
    unset = unset_tensors(model)
    if unset:
        raise RuntimeError(
            f"{method.name}.load_task left {len(unset)} tensors unset ({unset[:3]}...): a "
            f"stored model must set every tensor; it relied on the random init")
    return model


def _evaluate_after(method: Method, bench: Benchmark, tasks: tuple[TaskInfo, ...], t: int,
                    store: ArtifactStore, policy: DevicePolicy, protocol: Protocol,
                    cfg: RunConfig) -> list[dict[str, Any]]:
    rows = []
    for j in range(t + 1):
        model = rebuild(method, tasks[j], store)
        acc = evaluate(model, bench.tasks[j].test, device=policy.device,
                       batch_size=protocol.eval_batch_size, amp=protocol.amp,
                       num_workers=cfg.num_workers, policy=policy)
        rows.append({"task": j, "task_name": tasks[j].name, "after_task": t,
                     "metric": "accuracy", "value": acc})
    return rows
