"""Command line: run methods on a benchmark, resumably, and summarise.

    python -m benchmarks.run --method all                       # offline mini benchmark
    python -m benchmarks.run --method nws,finetune --benchmark split_cifar100 \\
        --protocol paper --seeds 1993 1994 1995 --data-root ~/data
    python -m benchmarks.run --list
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
from pathlib import Path
from typing import Any

from benchmarks.archs import ARCHS, WeightsUnavailableError
from benchmarks.data import BENCHMARKS, DataUnavailableError
from benchmarks.harness import MIB, RunConfig, RunConflictError, build_benchmark, run
from benchmarks.methods import METHODS
from benchmarks.protocols import PROTOCOLS
from benchmarks.registry import UnknownNameError
from benchmarks.results import load_rows
from benchmarks.training import DEFAULT_CHECKPOINT_EVERY, TrainingDivergedError

DEFAULT_SEEDS = {"paper": [1993, 1994, 1995], "authors-code": [1993, 1994, 1995]}


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
    p.add_argument("--method", default="all", help="comma-separated method names, or 'all'")
    p.add_argument("--benchmark", default="split_digits")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--protocol", default="quick")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="default: 1993 1994 1995 for paper protocols, else 1993")
    p.add_argument("--tasks", type=int, default=None, help="learn only the first N tasks")
    p.add_argument("--data-root", default=None,
                   help="data folder (default $NWS_DATA_ROOT or ~/.cache/nws_bench/data)")
    p.add_argument("--out", default="results/runs", help="folder of run folders")
    p.add_argument("--pretrained", default=None,
                   help="imagenet | none | PATH (default: the benchmark's; imagenet for paper "
                        "benchmarks, none for split_digits and synthetic)")
    p.add_argument("--weights", default=None, help="state-dict file (same as --pretrained PATH)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels: bit-exact reruns and resumes on CPU")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. --opt beta=0.3 (see --list)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="protocol override, e.g. --set epochs=10 --set lr=0.05")
    p.add_argument("--bench-opt", action="append", metavar="KEY=VALUE",
                   help="benchmark option, e.g. --bench-opt download=false")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--checkpoint-every", default=DEFAULT_CHECKPOINT_EVERY, metavar="N|Nm",
                   help="phase checkpoint every N epochs (e.g. 5) or minutes (e.g. 10m, also "
                        "90s, 2h); the last epoch of a phase always (default: %(default)s)")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="phase checkpoints under DIR/<run id>/ (e.g. node-local scratch; "
                        "default: the run folder's checkpoints/)")
    return p


def list_registries() -> str:
    from benchmarks.protocols import resolve_protocol

    parts = [METHODS.describe(), BENCHMARKS.describe(), ARCHS.describe(), PROTOCOLS.describe()]
    for name in METHODS.names():
        try:
            settings = METHODS.get(name).settings("default")
        except ImportError as err:
            parts.append(f"options of {name}: unavailable ({err})")
            continue
        if settings:
            rows = [f"    {k} = {s.value!r}  ({s.source})" for k, s in settings.items()]
            parts.append(f"options of {name}:\n" + "\n".join(rows))
    proto = resolve_protocol("paper", "split_cifar100")
    rows = [f"    {k} = {getattr(proto, k)!r}  ({src})" for k, src in proto.provenance.items()]
    parts.append("protocol fields (paper, split_cifar100) for --set:\n" + "\n".join(rows))
    return "\n\n".join(parts)


def summarise(run_dirs: list[Path]) -> str:
    df = load_rows(run_dirs[0].parent) if run_dirs else None
    if df is None or df.empty:
        return "no results"
    df = df[df.run_id.isin([d.name for d in run_dirs])]
    last = df.groupby("run_id").after_task.transform("max")
    final = df[(df.metric == "accuracy") & (df.after_task == last)]
    acc = final.groupby(["method", "seed"]).value.mean().groupby("method").agg(["mean", "std"])
    mem = df[(df.metric == "store_bytes") & (df.after_task == last)]
    mem = mem.groupby("method").value.mean() / MIB
    lines = [f"{'method':<12} {'avg acc':>9} {'± std':>7} {'stored MiB':>11}"]
    for m in acc.index:
        std = acc.loc[m, "std"]
        lines.append(f"{m:<12} {acc.loc[m, 'mean']:>9.2%} "
                     f"{'' if std != std else f'{std:.2%}':>7} {mem.get(m, float('nan')):>11.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.list:
        print(list_registries())
        return 0
    try:
        for registry, name in ((BENCHMARKS, args.benchmark), (ARCHS, args.arch),
                               (PROTOCOLS, args.protocol)):
            registry.get(name)
        methods = METHODS.names() if args.method == "all" else args.method.split(",")
        for name in methods:
            METHODS.get(name)
        seeds = args.seeds or DEFAULT_SEEDS.get(args.protocol, [1993])
        base = dict(
            benchmark=args.benchmark, arch=args.arch, protocol=args.protocol,
            data_root=args.data_root, out=args.out,
            pretrained=args.weights or args.pretrained, num_tasks=args.tasks,
            device=args.device, deterministic=args.deterministic, num_workers=args.workers,
            protocol_overrides=_pairs(args.set, "--set"),
            benchmark_options=_pairs(args.bench_opt, "--bench-opt"),
            progress=not args.no_progress,
            checkpoint_every=args.checkpoint_every, checkpoint_dir=args.checkpoint_dir,
        )
        options = _pairs(args.opt, "--opt")
        bench = build_benchmark(RunConfig(method=methods[0], **base))
        if bench.synthetic:
            print("NOTE: synthetic data (asked for by name); every result row says so.")
        run_dirs = []
        for seed in seeds:
            for name in methods:
                own = {k: v for k, v in options.items()
                       if k in METHODS.get(name).settings(args.benchmark)}
                cfg = RunConfig(method=name, seed=seed, method_options=own, **base)
                run_dirs.append(run(cfg, bench))
    except (UnknownNameError, DataUnavailableError, WeightsUnavailableError, RunConflictError,
            TrainingDivergedError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print(summarise(run_dirs))
    print(f"\nresults: {Path(args.out).resolve()} (load with "
          f"benchmarks.results.load_rows or pandas.read_csv on each rows.csv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
