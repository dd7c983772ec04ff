"""The runs of one ``benchmarks.run`` command: the run configurations its flags make (one
per method and seed) and running them here, one after the other.

The run flags and what each means live in one place, :mod:`benchmarks.engine.run_config`.
A launcher (:mod:`benchmarks.exec.launch`) plans the same configurations as jobs, each job
carrying its :class:`RunConfig` as data.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from benchmarks.core.identity import resolve_input_path, resolve_option_paths
from benchmarks.core.lock import RunLockedError
from benchmarks.core.protocols import PROTOCOLS, default_seeds
from benchmarks.core.registry import UnknownNameError
from benchmarks.core.results import load_rows, rows_damage
from benchmarks.data import BENCHMARKS, DataUnavailableError, check_benchmark_options
from benchmarks.engine.checkpoints import CheckpointPolicy
from benchmarks.engine.harness import MIB, RunConflictError, build_benchmark, run
from benchmarks.engine.run_config import (
    RUN_FLAGS,
    RunConfig,
    add_run_arguments,
    cli_values,
)
from benchmarks.engine.trackers import check_trackers
from benchmarks.engine.training import TrainingDivergedError
from benchmarks.methods.table import METHODS
from benchmarks.models.archs import ARCHS, WeightsUnavailableError
from nws.atomic import StorageError

__all__ = ["CLI_ERRORS", "PROG", "RUN_FLAGS", "add_run_arguments", "apply_process_settings",
           "execute", "execute_configs", "run_configs", "run_parser", "summarise"]

# What stops a run with a message (exit 2) rather than a traceback.
CLI_ERRORS = (UnknownNameError, DataUnavailableError, WeightsUnavailableError, RunConflictError,
              RunLockedError, TrainingDivergedError, ValueError, StorageError)
PROG = "python -m benchmarks.run"


def run_parser() -> argparse.ArgumentParser:
    """A parser of the run flags alone."""
    p = argparse.ArgumentParser(prog=PROG)
    add_run_arguments(p)
    return p


def summarise(run_dirs: list[Path]) -> str:
    df = load_rows(run_dirs[0].parent) if run_dirs else None
    if df is None or df.empty:
        return "no results"
    df = df[df.run_id.isin([d.name for d in run_dirs])]
    last = df.groupby("run_id").after_task.transform("max")
    final = df[(df.metric == "accuracy") & (df.after_task == last)]
    # a NaN accuracy makes its run's and method's means NaN, never a mean of the other tasks
    acc = final.groupby(["method", "seed"]).value.agg(lambda v: v.mean(skipna=False))
    acc = acc.groupby("method").agg([lambda v: v.mean(skipna=False), "std"])
    acc.columns = ["mean", "std"]
    mem = df[(df.metric == "store_bytes") & (df.after_task == last)]
    mem = mem.groupby("method").value.mean() / MIB
    lines = [f"{'method':<12} {'avg acc':>9} {'± std':>7} {'stored MiB':>11}"]
    for m in acc.index:
        std = acc.loc[m, "std"]
        lines.append(f"{m:<12} {acc.loc[m, 'mean']:>9.2%} "
                     f"{'' if std != std else f'{std:.2%}':>7} {mem.get(m, float('nan')):>11.2f}")
    for run_id, rows in df.groupby("run_id"):
        damage = rows_damage(rows)
        if damage:
            lines.append(f"damaged: {run_id}: {damage}")
    return "\n".join(lines)


def run_configs(args: argparse.Namespace) -> list[RunConfig]:
    """The plan: one :class:`RunConfig` per (seed, method), names checked against the
    registries (raises :class:`UnknownNameError`), ``--bench-opt`` and ``--opt`` keys against
    what the benchmark and the planned methods take, every value against its range
    (``ValueError``); nothing is written."""
    for registry, name in ((BENCHMARKS, args.benchmark), (ARCHS, args.arch),
                           (PROTOCOLS, args.protocol)):
        registry.get(name)
    # "nws, finetune" is read as "nws,finetune"; names and specs (pkg.mod:Class) resolved
    # (PluginError, a ValueError, for a bad spec); a method or seed given twice is one run
    # (two jobs of one run would only meet at its lock)
    methods = METHODS.split(args.method)
    from benchmarks.core.protocols import resolve_protocol

    for flag in ("out", "checkpoint_dir", "kernels_dir"):
        folder = getattr(args, flag)
        if folder and Path(folder).expanduser().exists() and not Path(
                folder).expanduser().is_dir():
            raise ValueError(f"--{flag.replace('_', '-')} {folder} is a file; give a folder "
                             f"(it is created if missing)")
    CheckpointPolicy.parse(args.checkpoint_every)  # a sweep's jobs would all stop on it
    base = cli_values(args)
    base["loggers"] = check_trackers(base["loggers"])  # a missing extra: before any folder
    resolve_protocol(args.protocol, args.benchmark).with_overrides(
        **base["protocol_overrides"])  # checks them
    check_benchmark_options(args.benchmark, base["benchmark_options"])
    options = base.pop("method_options")
    settings = {name: METHODS.get(name).settings(args.benchmark) for name in methods}
    unknown = sorted(k for k in options if not any(k in s for s in settings.values()))
    if unknown:  # a key some planned method takes goes to that method only
        valid = "; ".join(f"{name}: {', '.join(s) or 'none'}" for name, s in settings.items())
        raise ValueError(f"--opt {', '.join(unknown)}: no planned method takes it; valid "
                         f"options ({valid})")
    chosen = {name: resolve_option_paths(settings[name], {
        k: v for k, v in options.items() if k in settings[name]}) for name in methods}
    for name in methods:  # each value against its option's range (benchmarks.core.checks)
        METHODS.get(name).resolve_options(args.benchmark, chosen[name])
    seeds = list(dict.fromkeys(args.seeds or default_seeds(args.protocol)))
    for name in ("out", "data_root", "kernels_dir", "checkpoint_dir"):  # a job may start elsewhere
        if base[name]:
            base[name] = str(Path(base[name]).expanduser().resolve())
    base["pretrained"] = resolve_input_path(base["pretrained"])
    # bars only on a terminal (tqdm writes to stderr); in logs one line per epoch
    base["progress"] = base["progress"] and sys.stderr.isatty()
    return [RunConfig(method=name, seed=seed, method_options=chosen[name], **base)
            for seed in seeds for name in methods]


def apply_process_settings(cfg: RunConfig) -> None:
    """The process fields of ``cfg`` (``--threads``, ``--kernels-dir``) for this process and
    its children."""
    if cfg.threads is not None:  # its range: THREADS, checked by the parser
        import torch

        torch.set_num_threads(cfg.threads)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # data-loader workers, kernels
            os.environ[var] = str(cfg.threads)
    if cfg.kernels_dir:
        from nws.cpu_kernels import DIR_ENV

        os.environ[DIR_ENV] = str(Path(cfg.kernels_dir).expanduser().resolve())


def execute_configs(configs: list[RunConfig]) -> list[Path]:
    """Run ``configs`` (one benchmark, one process's settings) here, one after the other;
    returns the run folders. Raises one of :data:`CLI_ERRORS` on bad input."""
    apply_process_settings(configs[0])
    bench = build_benchmark(configs[0])
    if bench.synthetic:
        print("NOTE: synthetic data (asked for by name); every result row says so.")
    return [run(cfg, bench) for cfg in configs]


def execute(args: argparse.Namespace) -> list[Path]:
    """Plan ``args`` (:func:`run_configs`) and run every planned run here."""
    return execute_configs(run_configs(args))


def with_threads(cfg: RunConfig, threads: int | None) -> RunConfig:
    """``cfg`` with ``threads`` unless the user chose its threads."""
    return cfg if cfg.threads is not None or threads is None else replace(cfg, threads=threads)
