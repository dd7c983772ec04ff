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
from dataclasses import asdict, dataclass
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
from benchmarks.data import BENCHMARKS, Benchmark, Task, check_benchmark_options
from benchmarks.data.files import CHECK_ONLY_OPTIONS
from benchmarks.engine.checkpoints import (
    CheckpointPolicy,
    adopt_checkpoints,
    checkpoint_folder,
    checkpoint_prefix,
)
from benchmarks.engine.run_config import RunConfig
from benchmarks.engine.trackers import TrackerSet
from benchmarks.engine.training import FitStats, PhaseSpec, evaluate, fit
from benchmarks.methods.contract import Method, MethodContext, TaskInfo
from benchmarks.methods.table import METHODS
from benchmarks.models.archs import Pretrained, check_input_size, no_init, unset_tensors

log = logging.getLogger("benchmarks")
MIB = 2**20


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


@dataclass
class Prepared:
    """One run resolved before any folder is touched: the method built, its protocol and
    device policy decided, its identity and run folder known."""

    cfg: RunConfig
    bench: Benchmark
    method: Method
    protocol: Protocol
    policy: DevicePolicy
    tasks: tuple[TaskInfo, ...]
    identity: dict[str, Any]
    option_defaults: dict[str, Any]
    rid: str
    results: ResultsStore
    every: CheckpointPolicy

    @property
    def tag(self) -> str:
        return f"[{type(self.method).name} s{self.cfg.seed}]"


def prepare(cfg: RunConfig, bench: Benchmark | None = None) -> Prepared:
    """Resolve ``cfg`` (options, protocol, device policy, identity, run id) and build its
    method; raises on bad input before any run folder exists."""
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
    ctx.protocol = protocol = method.adjust_protocol(protocol)
    identity = run_identity(cfg, protocol, options, pretrained_source, device, method_cls)
    identity |= {f"policy_{k}": getattr(policy, k) for k in method_cls.policy_fields}
    defaults = {k: s.value for k, s in settings.items()}
    rid = run_id(cfg, identity, defaults)
    results = ResultsStore(Path(cfg.out).expanduser().resolve() / rid)
    return Prepared(cfg, bench, method, protocol, policy, tasks, identity, defaults, rid,
                    results, CheckpointPolicy.parse(cfg.checkpoint_every))


def run(cfg: RunConfig, bench: Benchmark | None = None) -> Path:
    """Run (or resume) one method with one seed; returns the run folder. The folder's lock is
    held throughout (:class:`~benchmarks.core.lock.RunLockedError` if another process holds it)."""
    r = prepare(cfg, bench)
    trackers = TrackerSet(cfg.loggers, r.results.dir, r.rid, r.identity)  # no folder yet
    # read only: no lock, no write (a finished run on a read-only disk reports itself done)
    if _finished(r):
        print(f"{r.tag} all {len(r.tasks)} tasks done in {r.results.dir}: nothing to do",
              flush=True)
        return r.results.dir
    with RunLock(r.results.dir), trackers:  # one writer per run folder, for the run's life
        return _run_locked(r, trackers)


def _finished(r: Prepared) -> bool:
    """Whether the folder holds this very run (:func:`check_resumable`) with every task's own
    accuracy row: then there is nothing to do and nothing to write, so the run needs no lock
    (a finished run on a read-only disk reports itself done). Anything unreadable is False:
    the locked path reports it."""
    try:
        previous = r.results.read_json("config.json")
        if not isinstance(previous, dict) or not isinstance(previous.get("identity"), dict):
            return False
        check_resumable(r.results.dir, previous["identity"], r.identity, r.option_defaults)
        return {t.index for t in r.tasks} <= r.results.finished_tasks()
    except (OSError, ValueError, RunConflictError):
        return False


def _run_locked(r: Prepared, trackers: TrackerSet | None = None) -> Path:
    """The body of :func:`run`, under the run folder's lock: check and write the folder's
    configuration, then learn and evaluate each task not finished yet."""
    checkpoints = _start_folder(r)
    store = ArtifactStore(r.results.dir / "artifacts")
    epochs = EpochLog(r.results.dir, type(r.method).EPOCH_FIGURES,
                      [trackers] if trackers else [])
    finished = r.results.finished_tasks()
    took: list[float] = []  # wall seconds of each task done in this launch
    for task, info in zip(r.bench.tasks, r.tasks, strict=True):
        if info.index in finished:
            continue
        started = time.perf_counter()
        if not store.has_task(info.index):
            _learn_task(r, info, task, store, checkpoints, epochs)
        else:
            log.info("%s task %d is in the store but not evaluated: evaluating", r.tag,
                     info.index)
        # The task is in the store: its phases' checkpoints are not needed now (also those a
        # kill between the commit and this line left behind).
        for done in checkpoints.glob(f"{checkpoint_prefix(info.index)}*"):
            done.unlink()
        rows = _task_rows(r, info, store, started)
        r.results.append([_base_row(r) | row for row in rows])
        if trackers is not None:
            trackers.task(info.index, rows)
        took.append(time.perf_counter() - started)
        _report_task(r, info, rows, store, took)
    return r.results.dir


def _start_folder(r: Prepared) -> Path:
    """Check the folder's previous configuration (a resume of this very run, else
    :class:`RunConflictError`), write this one's ``config.json`` and ``env.json``; returns
    the checkpoint folder, with the previous launch's checkpoints moved into it."""
    try:
        previous = r.results.read_json("config.json")
        if previous is not None:
            check_resumable(r.results.dir, previous["identity"], r.identity,
                            r.option_defaults)
    except (ValueError, KeyError, TypeError) as err:  # not JSON, or not a run's config
        raise RunConflictError(
            f"{r.results.dir / 'config.json'} is damaged ({type(err).__name__}: {err}); "
            f"nothing was changed. Restore it (e.g. from a backup), or delete that folder to "
            f"start over") from err
    cfg = r.cfg
    checkpoints = checkpoint_folder(cfg.checkpoint_dir, r.rid, r.results.dir)
    if previous is not None:
        before = checkpoint_folder((previous.get("run_config") or {}).get("checkpoint_dir"),
                                   r.rid, r.results.dir)
        adopt_checkpoints(before, checkpoints)
    settings = type(r.method).settings(cfg.benchmark)
    r.results.write_json("config.json", {
        "identity": r.identity, "run_id": r.rid, "protocol_provenance": r.protocol.provenance,
        "option_provenance": {k: s.source for k, s in settings.items()},
        "synthetic": r.bench.synthetic, "benchmark_notes": r.bench.notes,
        "tasks": [asdict(t) for t in r.tasks], "run_config": cfg.to_dict(),
        "run_config_sources": cfg.sources(),
    })
    r.results.write_json("env.json", environment(r.policy.device, cfg.deterministic)
                         | {"device_policy": r.policy.describe()})
    return checkpoints


def _base_row(r: Prepared) -> dict[str, Any]:
    cfg = r.cfg
    return {"run_id": r.rid, "benchmark": cfg.benchmark, "method": type(r.method).name,
            "arch": cfg.arch, "protocol": cfg.protocol, "seed": cfg.seed,
            "synthetic": r.bench.synthetic}


def _task_rows(r: Prepared, info: TaskInfo, store: ArtifactStore, started: float
               ) -> list[dict[str, Any]]:
    """The rows task ``info`` adds: the accuracy of every task so far (each rebuilt from the
    store), its measurements and the store's sizes; its own accuracy row last (its presence
    marks the task finished)."""
    t = info.index
    rows = _evaluate_after(r, t, store)
    meta = store.task_meta(t)
    measured = {m: meta.get(m) for m in ("train_seconds", "train_steps", "final_train_loss")}
    measured |= r.method.task_metrics(info, store)
    measured |= {"task_bytes": store.nbytes(t), "shared_bytes": store.nbytes(None),
                 "store_bytes": store.total_bytes(),
                 "task_seconds": round(time.perf_counter() - started, 3)}
    rows += [{"task": t, "task_name": info.name, "after_task": t, "metric": m, "value": v}
             for m, v in measured.items()]
    rows.sort(key=lambda row: row["metric"] == "accuracy" and row["task"] == t)
    return rows


def _report_task(r: Prepared, info: TaskInfo, rows: list[dict[str, Any]],
                 store: ArtifactStore, took: list[float]) -> None:
    """The task's line: its accuracy, the mean so far, the store's size, the ETA."""
    t, n = info.index, len(r.tasks)
    own = next(x["value"] for x in rows if x["metric"] == "accuracy" and x["task"] == t)
    mean = sum(x["value"] for x in rows if x["metric"] == "accuracy") / (t + 1)
    seconds = store.task_meta(t).get("train_seconds", float("nan"))
    left = n - t - 1
    print(f"{r.tag} task {t + 1}/{n} {info.name}: acc {own:.1%} | mean over {t + 1} "
          f"{mean:.1%} | stored {store.total_bytes() / MIB:.2f} MiB | {seconds:.1f} s"
          + (f" | {left} left, ETA {_clock(_eta(took, left))}" if left else ""), flush=True)


def _eta(took: list[float], left: int) -> float:
    """Seconds for ``left`` more tasks, from the tasks done so far in this launch. The first
    carries one-time costs (NWS's pools and CPU-kernel build, data caches) and took several
    times a later task on the mini benchmark (measured: docs/performance.md, The quick
    start), so once a later task is done the first is left out."""
    later = took[1:] or took
    return sum(later) / len(later) * left


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _learn_task(r: Prepared, info: TaskInfo, task: Task, store: ArtifactStore,
                checkpoints: Path, epochs: EpochLog | None = None) -> None:
    """Train task ``info`` and commit it to the store. Each training phase checkpoints as
    ``r.every`` says and after its last epoch; a resumed task replays its phases in order,
    and what a method does between them (PackNet's pruning, NWS's k-means pools) runs again
    on the restored weights and RNG state, so it repeats exactly."""
    cfg, method, device = r.cfg, r.method, r.policy.device
    seed_global(cfg.seed, info.index, "init")
    model = method.model_for_task(info, store).to(device)
    stats = FitStats()
    calls = itertools.count()
    prefix = checkpoint_prefix(info.index)
    desc = f"{r.tag} task {info.index + 1}/{len(r.tasks)} {info.name}"

    def phase_fit(m: torch.nn.Module, proto: Protocol, phase: str) -> None:
        n = next(calls)
        fit(m, method, proto, task.train, PhaseSpec(
            device=device, seed=cfg.seed, task=info.index, phase=phase,
            num_workers=cfg.num_workers, progress=cfg.progress, desc=f"{desc} [{phase}]",
            checkpoint=checkpoints / f"{prefix}{n}-{phase}.pt", checkpoint_every=r.every,
            policy=r.policy,
            recorder=epochs.phase(info.index, n, phase, method, m) if epochs else None),
            stats)

    phase_fit(model, r.protocol, "train")
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


def _evaluate_after(r: Prepared, t: int, store: ArtifactStore) -> list[dict[str, Any]]:
    """Accuracy row of every task ``j <= t``, each model rebuilt from the store alone."""
    rows = []
    for j in range(t + 1):
        model = rebuild(r.method, r.tasks[j], store)
        acc = evaluate(model, r.bench.tasks[j].test, device=r.policy.device,
                       batch_size=r.protocol.eval_batch_size, amp=r.protocol.amp,
                       num_workers=r.cfg.num_workers, policy=r.policy)
        rows.append({"task": j, "task_name": r.tasks[j].name, "after_task": t,
                     "metric": "accuracy", "value": acc})
    return rows
