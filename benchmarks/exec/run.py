"""Command line: run methods on a benchmark, resumably, and summarise.

    python -m benchmarks.run --method all                       # offline mini benchmark
    python -m benchmarks.run --method nws,finetune --benchmark split_cifar100 \\
        --protocol paper --seeds 1993 1994 1995 --data-root ~/data
    python -m benchmarks.run --method nws,mypkg.methods:MyMethod   # a plugin beside NWS
    python -m benchmarks.run --list
    python -m benchmarks.run --method all --seeds 1993 1994 --launcher local --jobs 2 --dry-run

``--launcher local|slurm`` runs the plan (methods x seeds) one run per job
(:mod:`benchmarks.exec.launch`); ``inline`` (the default) runs it here, one run after the other.
The run flags and what they make live in :mod:`benchmarks.exec.runs`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from benchmarks.core.protocols import PROTOCOLS
from benchmarks.data import BENCHMARKS
from benchmarks.exec.plan import add_launcher_arguments
from benchmarks.exec.runs import (
    CLI_ERRORS,
    PROG,
    RUN_FLAGS,
    add_run_arguments,
    apply_process_settings,
    execute,
    run_configs,
    summarise,
)
from benchmarks.methods.table import METHODS
from benchmarks.models.archs import ARCHS

__all__ = ["CLI_ERRORS", "RUN_FLAGS", "apply_process_settings", "execute", "list_registries",
           "main", "parser", "run_configs", "summarise"]


def parser() -> argparse.ArgumentParser:
    """The run flags (:func:`benchmarks.exec.runs.add_run_arguments`) and the launcher's."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="show every registry and exit")
    add_run_arguments(p)
    add_launcher_arguments(p)
    return p


def list_registries() -> str:
    from benchmarks.core.protocols import RULES, resolve_protocol

    parts = [METHODS.describe(), BENCHMARKS.describe(), ARCHS.describe(), PROTOCOLS.describe()]
    for name in [*METHODS.names(), *METHODS.plugins()]:  # broken plugins: in describe()
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
