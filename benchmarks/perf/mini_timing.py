"""How long the quick start's first command takes here, as a figure (issue 17).

    python -m benchmarks.mini_timing                 # or: tox -e mini-timing
    python -m benchmarks.mini_timing --warm-kernels --json timing.json

Runs exactly the commands of ``tox -e mini`` (read from ``[testenv:mini]`` in ``tox.ini``:
every method on split_digits, then the tables, then the figures) in a fresh folder, one after
the other, each timed by the wall clock, and prints:

- the wall time of each command and of all three (the environment build excluded);
- per method, from the runs' own rows: training seconds (``train_seconds``, summed over the
  tasks) and task seconds (``task_seconds``: training + set-up such as NWS's k-means pools +
  commit + evaluating every stored task); the rest of the run command is start-up (imports,
  data) and saving the run's files;
- the lowest accuracy of each method over every task, rebuilt from the store after the last
  task (the mini's quality bar: every task >= 75%, well above the 50% of chance on these
  two-class tasks; it was 90% until AQD's default became QTool's recipe, which learns more
  slowly on this smoke schedule; measured: docs/performance.md, Accuracy figures behind
  quick-protocol settings and test bars).

It starts as a newcomer's first command does: an empty results folder, empty derived-value
cache (``NWS_CACHE_DIR``) and, unless ``--warm-kernels``, an empty build folder for NWS's CPU
kernels (``NWS_KERNELS_DIR``: the one-time C++ build is included). Exit status 1 when the
whole took longer than ``--budget`` minutes or a task fell below ``--min-accuracy``, so a
release check can call it; it is a measurement, not a unit test (the machine's speed drifts
with its load: run it alone).
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from benchmarks.core.results import load_rows
from nws.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent.parent
RUNS_DEFAULT = "results/runs"


def mini_commands(tox_ini: Path, work: Path, extra: Sequence[str]) -> list[list[str]]:
    """``[testenv:mini]``'s commands, redirected into ``work`` (runs, tables, figures, the
    report) and run
    by this interpreter; ``extra`` replaces ``{posargs}``."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(tox_ini)
    try:
        text = parser["testenv:mini"]["commands"]
    except KeyError as err:
        raise ValueError(f"{tox_ini} has no [testenv:mini] commands") from err
    commands = []
    for line in filter(None, (raw.strip() for raw in text.splitlines())):
        words = []
        for word in shlex.split(line):
            if word == "{posargs}":
                words += list(extra)
            else:
                words.append(str(work / "runs") if word == RUNS_DEFAULT else word)
        if words[0] == "python":
            words[0] = sys.executable
        module = words[words.index("-m") + 1] if "-m" in words else ""
        words += {"benchmarks.run": ["--out", str(work / "runs")],
                  "analysis.tables": ["--out", str(work / "tables")],
                  "analysis.figures": ["--out", str(work / "figures")],
                  "analysis.report": ["--out", str(work / "tables" / "report.html")],
                  }.get(module, [])
        commands.append(words)
    return commands


def per_method(rows: pd.DataFrame) -> pd.DataFrame:
    """Per method: summed train and task seconds, and the lowest accuracy of any task after
    the last task (from the store)."""
    out = {}
    for method, df in rows.groupby("method", sort=False):
        last = df.after_task.max()
        acc = df[(df.metric == "accuracy") & (df.after_task == last)]
        out[method] = {
            "train_s": df.loc[df.metric == "train_seconds", "value"].sum(),
            "task_s": df.loc[df.metric == "task_seconds", "value"].sum(),
            "tasks": int(acc.task.nunique()),
            "min_accuracy": acc.value.min(),
            "mean_accuracy": acc.value.mean(),
        }
    return pd.DataFrame.from_dict(out, orient="index")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s"


def _check_work(p: argparse.ArgumentParser, work: Path, warm_kernels: bool) -> None:
    """Exit 2 unless ``work`` can hold a first command's fresh runs, cache (and kernels)."""
    if work.exists() and not work.is_dir():
        p.error(f"--work {work} is a file; give a folder (new or empty)")
    for name in ("runs", "cache") + (() if warm_kernels else ("kernels",)):
        sub = work / name
        if sub.exists() and (not sub.is_dir() or any(sub.iterdir())):
            p.error(f"{sub} is not an empty folder: a first command starts with no runs, "
                    f"cache or kernels to reuse; give an empty --work")
    if work.exists() and not os.access(work, os.W_OK | os.X_OK):
        p.error(f"--work {work} is not writable; give a folder you can write to")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mini_timing",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--work", help="folder for the runs, tables and figures (default: a "
                   "fresh temporary folder, deleted afterwards)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--warm-kernels", action="store_true",
                   help="use the NWS CPU kernels already built (default: build them afresh)")
    p.add_argument("--budget", type=float, default=10.0, help="minutes (default 10)")
    p.add_argument("--min-accuracy", type=float, default=0.75,
                   help="the lowest task accuracy every method must reach, as a fraction "
                        "(default 0.75: see the module doc)")
    p.add_argument("extra", nargs="*", help="arguments for the run command (tox's posargs), "
                   "after --, e.g. -- --bench-opt size=16")
    args = p.parse_args(argv)
    if not 0 < args.budget < float("inf"):
        p.error(f"--budget {args.budget:g}: give minutes > 0, e.g. --budget 10")
    if not 0 <= args.min_accuracy <= 1:
        p.error(f"--min-accuracy {args.min_accuracy:g}: give a fraction in 0..1, e.g. 0.9")
    if args.json:
        out = Path(args.json).expanduser().resolve()
        if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
            p.error(f"--json {args.json}: cannot write a file there (give a file path in an "
                    f"existing, writable folder)")
    if args.work:
        _check_work(p, Path(args.work).expanduser().resolve(), args.warm_kernels)

    with tempfile.TemporaryDirectory(prefix="nws-mini-timing-") as tmp:
        work = Path(args.work).expanduser().resolve() if args.work else Path(tmp)
        try:
            commands = mini_commands(ROOT / "tox.ini", work, args.extra)
        except ValueError as err:
            p.error(str(err))
        env = dict(os.environ, PYTHONHASHSEED="0", MPLBACKEND="Agg",
                   NWS_CACHE_DIR=str(work / "cache"))
        if not args.warm_kernels:
            env["NWS_KERNELS_DIR"] = str(work / "kernels")
        walls = []
        for cmd in commands:
            module = cmd[cmd.index("-m") + 1]
            print("$", shlex.join(cmd), flush=True)
            started = time.perf_counter()
            done = subprocess.run(cmd, cwd=ROOT, env=env)
            walls.append((module, time.perf_counter() - started))
            if done.returncode:
                print(f"{module} exited {done.returncode}", file=sys.stderr)
                return done.returncode
        methods = per_method(load_rows(work / "runs"))
    if methods.empty:
        print(f"FAILED: the run command wrote no rows under {work / 'runs'} (did the "
              f"arguments after -- stop it early, e.g. --help?)", file=sys.stderr)
        return 1

    total = sum(s for _, s in walls)
    print(f"\n## tox -e mini: {_clock(total)} ({total:.0f} s), "
          f"kernels {'warm' if args.warm_kernels else 'built afresh'}")
    for name, seconds in walls:
        print(f"- {name}: {seconds:.1f} s")
    print("\n| method | train s | task s | tasks | lowest task accuracy | mean |")
    print("|---|---|---|---|---|---|")
    for m, r in methods.iterrows():
        print(f"| {m} | {r.train_s:.1f} | {r.task_s:.1f} | {int(r.tasks)} | "
              f"{r.min_accuracy:.1%} | {r.mean_accuracy:.1%} |")
    run_s = dict(walls).get("benchmarks.run", 0.0)
    print(f"\nrun command: {methods.task_s.sum():.1f} s in tasks, "
          f"{run_s - methods.task_s.sum():.1f} s start-up and files")
    if args.json:
        try:
            atomic_write_text(Path(args.json).expanduser(), json.dumps({
                "total_seconds": total, "commands": dict(walls),
                "warm_kernels": args.warm_kernels, "methods": methods.to_dict(orient="index"),
                "extra": args.extra}, indent=2))
        except OSError as err:
            print(f"error: --json {args.json}: {err.strerror}", file=sys.stderr)
            return 2
    failed = []
    if total > args.budget * 60:
        failed.append(f"took {_clock(total)}, over the {args.budget:g}-minute budget")
    low = methods[~(methods.min_accuracy >= args.min_accuracy)]  # NaN: no accuracy rows
    failed += [f"{m}: a task at {r.min_accuracy:.1%} < {args.min_accuracy:.0%}"
               for m, r in low.iterrows()]
    for line in failed:
        print("FAILED:", line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
