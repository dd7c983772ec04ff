"""The runs of one ``benchmarks.run`` command: the run flags (every job of a sweep gets them),
the run configurations they make, and running those here, one after the other.

The CLI (:mod:`benchmarks.exec.run`) adds the launcher flags on top; a launcher
(:mod:`benchmarks.exec.launch`) plans the same configurations as jobs, each job a command line
of these flags only (:func:`job_argv`), parsed again by :func:`run_parser`.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.core.checks import Range, flag_type
from benchmarks.core.device_policy import SEARCH_PATHS
from benchmarks.core.identity import resolve_input_path, resolve_option_paths
from benchmarks.core.lock import RunLockedError
from benchmarks.core.protocols import PROTOCOLS, default_seeds
from benchmarks.core.registry import UnknownNameError
from benchmarks.core.results import load_rows, rows_damage
from benchmarks.data import BENCHMARKS, DataUnavailableError, check_benchmark_options
from benchmarks.engine.checkpoints import DEFAULT_CHECKPOINT_EVERY, CheckpointPolicy
from benchmarks.engine.harness import MIB, RunConfig, RunConflictError, build_benchmark, run
from benchmarks.engine.trackers import check_trackers
from benchmarks.engine.training import TrainingDivergedError
from benchmarks.methods.table import METHODS
from benchmarks.models.archs import ARCHS, WeightsUnavailableError
from nws.atomic import StorageError

# What stops a run with a message (exit 2) rather than a traceback.
CLI_ERRORS = (UnknownNameError, DataUnavailableError, WeightsUnavailableError, RunConflictError,
              RunLockedError, TrainingDivergedError, ValueError, StorageError)
RUN_FLAGS = "run"  # title of the parser group whose flags each job of a sweep gets
PROG = "python -m benchmarks.run"
# Valid ranges of the count flags (benchmarks.core.checks), with the flags below.
SEED = Range(0, 2**63 - 1, "a seed names its run (s<seed>) and derives 63-bit stream seeds",
             integer=True)
WORKERS = Range(0, 256, "data-loader processes: 0 loads in this process; each one more is "
                "a process with its own copy of the data set", integer=True)
THREADS = Range(1, 1024, "torch/OpenMP threads: at least one; torch takes any count and a "
                "huge one fails later, in its thread pool: 1024 is past any one machine's "
                "cores", integer=True)


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(text.lower(), text)


def _pairs(items: list[str] | None, flag: str) -> dict[str, Any]:
    out = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep:
            raise SystemExit(f"error: {flag} takes KEY=VALUE, got {item!r}")
        out[key] = _value(val)
    return out


def add_run_arguments(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """Add the run flags to ``p`` as group :data:`RUN_FLAGS`; returns their actions."""
    r = p.add_argument_group(RUN_FLAGS, "what to run (every job of a sweep gets these)")
    actions: list[argparse.Action] = []

    def add(*names: str, **kwargs: Any) -> None:
        actions.append(r.add_argument(*names, **kwargs))

    add("--method", default="all",
        help="comma-separated method names or plugin specs (pkg.module:Class), or 'all'")
    add("--benchmark", default="split_digits")
    add("--arch", default="resnet18")
    add("--protocol", default="quick")
    add("--seeds", type=flag_type(int, SEED), nargs="+", default=None,
        help="default: 1993 1994 1995 for paper protocols, else 1993")
    add("--tasks", type=flag_type(int, Range(1, None, "a run learns at least one task",
                                             integer=True)),
        default=None, help="learn only the first N tasks")
    add("--data-root", default=None,
        help="data folder (default $NWS_DATA_ROOT or ~/.cache/nws_bench/data)")
    add("--out", default="results/runs", help="folder of run folders")
    add("--pretrained", default=None,
        help="imagenet | none | PATH (default: the benchmark's; imagenet for paper "
             "benchmarks, none for split_digits and synthetic)")
    add("--weights", default=None, help="state-dict file (same as --pretrained PATH)")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add("--deterministic", action="store_true",
        help="deterministic kernels: bit-exact reruns and resumes on CPU")
    add("--workers", type=flag_type(int, WORKERS), default=0,
        help="data-loader worker processes")
    add("--opt", action="append", metavar="KEY=VALUE",
        help="method option, e.g. --opt beta=0.3 (see --list)")
    add("--set", action="append", metavar="KEY=VALUE",
        help="protocol override, e.g. --set epochs=10 --set lr=0.05")
    add("--bench-opt", action="append", metavar="KEY=VALUE",
        help="benchmark option, e.g. --bench-opt download=false")
    add("--no-progress", action="store_true",
        help="no progress bars (also off when the output is not a terminal: one log "
             "line per epoch instead)")
    add("--threads", type=flag_type(int, THREADS), default=None,
        help="torch and OpenMP threads of this run (default: torch's choice; the "
             "local launcher divides the cores among its jobs)")
    add("--kernels-dir", default=None,
        help="build/cache folder of the NWS CPU kernels (default $NWS_KERNELS_DIR, "
             "else $TORCH_EXTENSIONS_DIR, else torch's cache)")
    add("--checkpoint-every", default=DEFAULT_CHECKPOINT_EVERY, metavar="N|Nm",
        help="phase checkpoint every N epochs (e.g. 5) or minutes (e.g. 10m, also "
             "90s, 2h); the last epoch of a phase always (default: %(default)s)")
    add("--checkpoint-dir", default=None, metavar="DIR",
        help="phase checkpoints under DIR/<run id>/ (e.g. node-local scratch; "
             "default: the run folder's checkpoints/)")
    add("--search", choices=SEARCH_PATHS, default=None,
        help="NWS search path (default: certificates on CPU, full elsewhere; "
             "$NWS_SEARCH); they differ only on float32 near ties, and a run keeps "
             "the path it started with")
    add("--logger", action="append", default=[], metavar="NAME",
        help="experiment tracker, repeatable: csv (always on: epochs.csv, rows.csv), "
             "tensorboard, wandb (offline unless WANDB_API_KEY is set); the last two "
             "need pip install 'nws-bench[track]'. Not part of the run's identity")
    add("--compile", action="store_true",
        help="torch.compile the training step (CUDA graphs on CUDA); off by default "
             "until measured on a GPU (README: On a GPU)")
    return actions


def run_parser() -> argparse.ArgumentParser:
    """A parser of the run flags alone: what a job's command line holds."""
    p = argparse.ArgumentParser(prog=PROG)
    add_run_arguments(p)
    return p


def job_argv(args: argparse.Namespace, cfg: RunConfig) -> list[str]:
    """The run flags of one run of ``args``'s plan: every run flag the user set (paths made
    absolute: a job may start elsewhere), with this run's method and seed, and
    ``--no-progress`` (a job's output is a log)."""
    out = ["--method", cfg.method, "--seeds", str(cfg.seed)]
    for action in add_run_arguments(argparse.ArgumentParser()):
        value = getattr(args, action.dest)
        if action.dest in ("method", "seeds", "no_progress") or (
                value == action.default and action.dest != "out"):  # out: always, absolute
            continue
        if action.dest in ("out", "data_root", "kernels_dir"):
            value = str(Path(value).expanduser().resolve())
        elif action.dest in ("weights", "pretrained"):  # as the run resolves it
            value = resolve_input_path(value)
        flag = action.option_strings[-1]
        if action.nargs == 0:  # a switch (store_true)
            out.append(flag)
        elif action.nargs == "+":
            out += [flag, *map(str, value)]
        elif isinstance(value, list):  # append: the flag once per item
            for item in value:
                out += [flag, str(item)]
        else:
            out += [flag, str(value)]
    return [*out, "--no-progress"]


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
    what the benchmark and the planned methods take (``ValueError``)."""
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
    loggers = check_trackers(args.logger)  # a missing extra: before any run folder
    overrides = _pairs(args.set, "--set")
    resolve_protocol(args.protocol, args.benchmark).with_overrides(**overrides)  # checks them
    bench_options = _pairs(args.bench_opt, "--bench-opt")
    check_benchmark_options(args.benchmark, bench_options)
    options = _pairs(args.opt, "--opt")
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
    base = dict(
        benchmark=args.benchmark, arch=args.arch, protocol=args.protocol,
        data_root=args.data_root, out=args.out,
        pretrained=resolve_input_path(args.weights or args.pretrained), num_tasks=args.tasks,
        device=args.device, deterministic=args.deterministic, num_workers=args.workers,
        protocol_overrides=overrides,
        benchmark_options=bench_options,
        # bars only on a terminal (tqdm writes to stderr); in logs one line per epoch
        progress=not args.no_progress and sys.stderr.isatty(),
        checkpoint_every=args.checkpoint_every, checkpoint_dir=args.checkpoint_dir,
        compile=args.compile, search=args.search, loggers=loggers,
    )
    return [RunConfig(method=name, seed=seed, method_options=chosen[name], **base)
            for seed in seeds for name in methods]


def apply_process_settings(args: argparse.Namespace) -> None:
    """``--threads`` and ``--kernels-dir`` for this process and its children."""
    if args.threads is not None:  # its range: THREADS, checked by the parser
        import torch

        torch.set_num_threads(args.threads)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # data-loader workers, kernels
            os.environ[var] = str(args.threads)
    if args.kernels_dir:
        from nws.cpu_kernels import DIR_ENV

        os.environ[DIR_ENV] = str(Path(args.kernels_dir).expanduser().resolve())


def execute(args: argparse.Namespace) -> list[Path]:
    """Run every planned run here, one after the other; returns the run folders. Raises one
    of :data:`CLI_ERRORS` on bad input."""
    apply_process_settings(args)
    configs = run_configs(args)
    bench = build_benchmark(configs[0])
    if bench.synthetic:
        print("NOTE: synthetic data (asked for by name); every result row says so.")
    return [run(cfg, bench) for cfg in configs]
