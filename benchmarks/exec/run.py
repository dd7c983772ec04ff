"""Command line: run methods on a benchmark, resumably, and summarise.

    python -m benchmarks.run --method all                       # offline mini benchmark
    python -m benchmarks.run --method nws,finetune --benchmark split_cifar100 \\
        --protocol paper --seeds 1993 1994 1995 --data-root ~/data
    python -m benchmarks.run --list
    python -m benchmarks.run --method all --seeds 1993 1994 --launcher local --jobs 2 --dry-run

``--launcher local|slurm`` runs the plan (methods x seeds) one run per job
(:mod:`benchmarks.exec.launch`); ``inline`` (the default) runs it here, one run after the other.
"""

from __future__ import annotations

import argparse
import ast
import logging
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
from benchmarks.engine.harness import MIB, RunConfig, RunConflictError, build_benchmark, run
from benchmarks.engine.trackers import check_trackers
from benchmarks.engine.training import (
    DEFAULT_CHECKPOINT_EVERY,
    CheckpointPolicy,
    TrainingDivergedError,
)
from benchmarks.methods.table import METHODS
from benchmarks.models.archs import ARCHS, WeightsUnavailableError
from nws.atomic import StorageError

# What stops a run with a message (exit 2) rather than a traceback.
CLI_ERRORS = (UnknownNameError, DataUnavailableError, WeightsUnavailableError, RunConflictError,
              RunLockedError, TrainingDivergedError, ValueError, StorageError)
RUN_FLAGS = "run"  # title of the parser group whose flags each job of a sweep gets
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="show every registry and exit")
    r = p.add_argument_group(RUN_FLAGS, "what to run (every job of a sweep gets these)")
    r.add_argument("--method", default="all", help="comma-separated method names, or 'all'")
    r.add_argument("--benchmark", default="split_digits")
    r.add_argument("--arch", default="resnet18")
    r.add_argument("--protocol", default="quick")
    r.add_argument("--seeds", type=flag_type(int, SEED), nargs="+", default=None,
                   help="default: 1993 1994 1995 for paper protocols, else 1993")
    r.add_argument("--tasks", type=flag_type(int, Range(1, None, "a run learns at least one task",
                                                   integer=True)),
                   default=None, help="learn only the first N tasks")
    r.add_argument("--data-root", default=None,
                   help="data folder (default $NWS_DATA_ROOT or ~/.cache/nws_bench/data)")
    r.add_argument("--out", default="results/runs", help="folder of run folders")
    r.add_argument("--pretrained", default=None,
                   help="imagenet | none | PATH (default: the benchmark's; imagenet for paper "
                        "benchmarks, none for split_digits and synthetic)")
    r.add_argument("--weights", default=None, help="state-dict file (same as --pretrained PATH)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    r.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels: bit-exact reruns and resumes on CPU")
    r.add_argument("--workers", type=flag_type(int, WORKERS), default=0,
                   help="data-loader worker processes")
    r.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. --opt beta=0.3 (see --list)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="protocol override, e.g. --set epochs=10 --set lr=0.05")
    r.add_argument("--bench-opt", action="append", metavar="KEY=VALUE",
                   help="benchmark option, e.g. --bench-opt download=false")
    r.add_argument("--no-progress", action="store_true",
                   help="no progress bars (also off when the output is not a terminal: one log "
                        "line per epoch instead)")
    r.add_argument("--threads", type=flag_type(int, THREADS), default=None,
                   help="torch and OpenMP threads of this run (default: torch's choice; the "
                        "local launcher divides the cores among its jobs)")
    r.add_argument("--kernels-dir", default=None,
                   help="build/cache folder of the NWS CPU kernels (default $NWS_KERNELS_DIR, "
                        "else $TORCH_EXTENSIONS_DIR, else torch's cache)")
    r.add_argument("--checkpoint-every", default=DEFAULT_CHECKPOINT_EVERY, metavar="N|Nm",
                   help="phase checkpoint every N epochs (e.g. 5) or minutes (e.g. 10m, also "
                        "90s, 2h); the last epoch of a phase always (default: %(default)s)")
    r.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="phase checkpoints under DIR/<run id>/ (e.g. node-local scratch; "
                        "default: the run folder's checkpoints/)")
    r.add_argument("--search", choices=SEARCH_PATHS, default=None,
                   help="NWS search path (default: certificates on CPU, full elsewhere; "
                        "$NWS_SEARCH); they differ only on float32 near ties, and a run keeps "
                        "the path it started with")
    r.add_argument("--logger", action="append", default=[], metavar="NAME",
                   help="experiment tracker, repeatable: csv (always on: epochs.csv, rows.csv), "
                        "tensorboard, wandb (offline unless WANDB_API_KEY is set); the last two "
                        "need pip install 'nws-bench[track]'. Not part of the run's identity")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (CUDA graphs on CUDA); off by default "
                        "until measured on a GPU (README: On a GPU)")
    from benchmarks.exec.launch import add_launcher_arguments

    add_launcher_arguments(p)
    return p


def list_registries() -> str:
    from benchmarks.core.protocols import RULES, resolve_protocol

    parts = [METHODS.describe(), BENCHMARKS.describe(), ARCHS.describe(), PROTOCOLS.describe()]
    for name in METHODS.names():
        try:
            settings = METHODS.get(name).settings("default")
        except ImportError as err:
            parts.append(f"options of {name}: unavailable ({err})")
            continue
        if settings:
            rows = [f"    {k} = {s.value!r}  ({s.source})"
                    + (f"; valid: {s.check.describe()}" if s.check else "")
                    for k, s in settings.items()]
            parts.append(f"options of {name}:\n" + "\n".join(rows))
    proto = resolve_protocol("paper", "split_cifar100")
    rows = [f"    {k} = {getattr(proto, k)!r}  ({src}); valid: {RULES[k].describe()}"
            for k, src in proto.provenance.items()]
    parts.append("protocol fields (paper, split_cifar100) for --set:\n" + "\n".join(rows))
    return "\n\n".join(parts)


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
    # "nws, finetune" is read as "nws,finetune"; a name or seed given twice is one run (two
    # jobs of one run would only meet at its lock)
    methods = METHODS.names() if args.method.strip() == "all" else list(dict.fromkeys(
        name.strip() for name in args.method.split(",")))
    for name in methods:
        METHODS.get(name)
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


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.list:
        print(list_registries())
        return 0
    try:
        if args.launcher != "inline" or args.dry_run:
            from benchmarks.exec.launch import launch

            return launch(p, args)
        run_dirs = execute(args)
    except CLI_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print(summarise(run_dirs))
    print(f"\nresults: {Path(args.out).resolve()} (load with "
          f"benchmarks.core.results.load_rows or pandas.read_csv on each rows.csv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
