"""The conformance check: does a method keep the contract that makes the suite's numbers
trustworthy? (docs/checking-a-method.md)

    python -m benchmarks.check_method SPEC [--quick] [--arch A] [--benchmark B] [--opt K=V]

On a few smoke-sized steps of a small benchmark (split_digits; ``--quick``: synthetic data),
CPU, deterministic, it checks

(a) **state only through the store**: every task rebuilt by ``load_task`` in a fresh process
    (one that never trained) gives the logits, on a fixed batch, of the model the run
    evaluated, and the same accuracy rows;
(b) **memory**: ``memory_formula`` equals the stored bytes, blob by blob, shared and per task;
(c) **resume**: a run SIGKILLed inside its last task (after an epoch checkpoint) and launched
    again ends with the rows (timings aside) and blobs of an uninterrupted run;
(d) **step cost**: a steady-state training step on the CUDA code path (forced on CPU:
    :mod:`benchmarks.perf.profile`) has no host-sync-prone op, for task 0 and a later task;
    its aten ops are reported against the plain (Finetune) step;
(e) **settings**: every option in ``SETTINGS`` has a source and a declared range its default
    satisfies, defaults resolve, and an unknown option is refused.

The same from Python/pytest: :func:`check_method` returns a :class:`Report`;
:func:`assert_conforms` raises ``AssertionError`` listing the violations.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.core.results import TIMING_METRICS, ResultsStore, load_rows
from benchmarks.data import BENCHMARKS
from benchmarks.engine.harness import RunConfig, build_benchmark
from benchmarks.engine.run_config import parse_pairs
from benchmarks.exec.runs import CLI_ERRORS
from benchmarks.methods.table import METHODS
from benchmarks.models.archs import ARCHS, check_input_size
from benchmarks.perf.conformance_diff import (
    blob_differences,
    blobs,
    logits_differences,
    memory_violations,
    rows_differences,
    run_memory,
    settings_violations,
)
from benchmarks.perf.conformance_runs import BATCH, Job
from benchmarks.perf.profile import PHASES, PLAIN, profile_method

CHECKS: dict[str, str] = {
    "a": "state only through the store",
    "b": "memory formula = stored bytes",
    "c": "resume after a kill",
    "d": "step cost",
    "e": "settings",
}
PROTOCOL = "smoke"  # 2 steps per epoch, batch 8
EPOCHS = 2  # so a task's last epoch starts after a checkpoint: the kill lands inside it
# Benchmark options that keep a run small (sizes only: they change no code path).
SMALL: dict[str, dict[str, Any]] = {
    "synthetic": {"n_train": 16, "n_test": 8, "size": 16},
    "split_digits": {"size": 16},
}
FRESH = ("the run", "the fresh process")  # how differences name the runs compared
RESUMED = ("the uninterrupted run", "the resumed run")
STEP_BATCH, STEP_SIZE = 4, 32  # the step-cost check's batch (counts do not depend on it)


@dataclass
class Outcome:
    """One check's result: its measured figure and the violations (none: it passed)."""

    check: str
    figure: str
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations

    def lines(self) -> list[str]:
        head = f"{'PASS' if self.passed else 'FAIL'} ({self.check}) {CHECKS[self.check]}: "
        return [head + self.figure] + [f"  violation ({self.check}): {v}"
                                       for v in self.violations]


@dataclass
class Report:
    spec: str
    setup: str
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(o.passed for o in self.outcomes)

    @property
    def violations(self) -> list[str]:
        return [f"({o.check}) {v}" for o in self.outcomes for v in o.violations]

    def verdict(self) -> str:
        failed = [o.check for o in self.outcomes if not o.passed]
        skipped = [c for c in CHECKS if c not in {o.check for o in self.outcomes}]
        unrun = f"; not run: {', '.join(skipped)}" if skipped else ""
        if not failed:
            n = len(self.outcomes)
            return (f"verdict: CONFORMING ({n} of {n} checks passed{unrun}; "
                    f"{self.seconds:.0f} s)")
        return (f"verdict: NOT CONFORMING ({', '.join(failed)} failed: "
                f"{len(self.violations)} violation(s){unrun}; {self.seconds:.0f} s)")

    def format(self) -> str:
        return "\n".join([self.setup, *(ln for o in self.outcomes for ln in o.lines()),
                          self.verdict()])


@dataclass
class Plan:
    """What the check runs: the run configuration of its runs, and the checks asked for."""

    spec: str
    cls: type
    config: RunConfig
    image_size: int
    only: tuple[str, ...]

    def describe(self, quick: bool) -> str:
        c = self.config
        return (f"conformance of {self.spec} ({self.cls.__module__}:{self.cls.__qualname__}, "
                f"name {self.cls.name!r}) on {c.benchmark} ({c.num_tasks} tasks, "
                f"{self.image_size}px), {c.arch}, protocol {c.protocol} with {EPOCHS} epochs, "
                f"CPU, deterministic{', quick' if quick else ''}")


def plan(spec: str, *, quick: bool = False, arch: str = "resnet18",
         benchmark: str | None = None, options: dict[str, Any] | None = None,
         only: Sequence[str] | None = None) -> Plan:
    """Everything checked before any work: the spec resolves, the names are registered, the
    options are in range, the data is there and fits the architecture. Raises one of the
    run CLI's errors (:data:`benchmarks.exec.runs.CLI_ERRORS`) on bad input."""
    only = tuple(only or CHECKS)
    bad = [c for c in only if c not in CHECKS]
    if bad:
        raise ValueError(f"checks {bad}: valid: {', '.join(CHECKS)}")
    cls = METHODS.get(spec)
    benchmark = benchmark or ("synthetic" if quick else "split_digits")
    ARCHS.get(arch)
    BENCHMARKS.get(benchmark)
    options = dict(options or {})
    cls.resolve_options(benchmark, options)
    config = RunConfig(method=spec, benchmark=benchmark, arch=arch, protocol=PROTOCOL,
                       num_tasks=2 if quick else 3, device="cpu", deterministic=True,
                       method_options=options, protocol_overrides={"epochs": EPOCHS},
                       benchmark_options=SMALL.get(benchmark, {}), progress=False,
                       checkpoint_every="1")
    bench = build_benchmark(config)
    check_input_size(arch, bench.input_size, benchmark)
    config.num_tasks = len(bench.tasks)
    return Plan(spec, cls, config, bench.input_size, only)


# -- (b) memory ------------------------------------------------------------------------------
def check_memory(cls: type, run_dir: Path) -> Outcome:
    formula, stored = run_memory(cls, run_dir)
    per_task = ", ".join(f"{sum(d.values()):,}" for d in stored.per_task)
    return Outcome("b", f"stored {stored.total():,} B (shared {sum(stored.shared.values()):,}; "
                        f"per task {per_task}), formula {formula.total():,} B",
                   memory_violations(formula, stored))


# -- (a), (c): runs compared ----------------------------------------------------------------
def failure(proc) -> str:
    """What stopped a job's process: its error's last line, or the signal."""
    if proc.returncode < 0:
        return f"killed by signal {-proc.returncode}"
    lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"exit status {proc.returncode}"


class Runs:
    """The check's runs, each in a fresh process (:class:`Job`), in folder ``root``."""

    def __init__(self, p: Plan, root: Path) -> None:
        self.p, self.root = p, root

    def job(self, name: str, out: Path, **kwargs: Any):
        config = asdict(self.p.config) | {"out": str(out)}
        return Job(self.p.spec, config, image_size=self.p.image_size, **kwargs).start(
            self.root, name)

    def whole(self) -> tuple[Path | None, str]:
        """The uninterrupted run, its evaluated models' logits recorded."""
        proc = self.job("whole", self.root / "whole", record=str(self.root / "whole.pt"))
        if proc.returncode != 0:
            return None, f"the uninterrupted run failed: {failure(proc)}"
        return Path(proc.stdout.strip().splitlines()[-1]), ""

    def fresh(self, whole: Path) -> Outcome:
        """(a): the finished run's folder without its rows, evaluated again by the harness in
        a process that never trained: every task is rebuilt from the store alone."""
        copy = self.root / "fresh" / whole.name
        shutil.copytree(whole, copy)
        (copy / "rows.csv").unlink()
        proc = self.job("fresh", copy.parent, record=str(self.root / "fresh.pt"))
        n = self.p.config.num_tasks or 0
        if proc.returncode != 0:
            return Outcome("a", "rebuilding the tasks in a fresh process failed",
                           [f"load_task in a fresh process: {failure(proc)}"])
        evaluated = torch.load(self.root / "whole.pt")
        rebuilt = torch.load(self.root / "fresh.pt")
        differ = logits_differences(evaluated, rebuilt, n)
        final = f"metric == 'accuracy' and after_task == {n - 1}"  # earlier rows: from
        rows = [f"accuracy from a fresh process: {d}"  # the store as it was then
                for d in rows_differences(whole, copy, final, names=FRESH)]
        return Outcome("a", f"{n} tasks rebuilt from the store in a fresh process: "
                            f"{n - len(differ)} of {n} give the logits of the model the run "
                            f"evaluated (bit for bit, fixed batch of {BATCH})", differ + rows)

    def resume(self, whole: Path) -> Outcome:
        """(c): killed after the last task's first epoch and one more step, relaunched."""
        steps = int(sum(load_rows(whole).query("metric == 'train_steps' and task == after_task")
                        .value))
        kill = steps - 1
        out = self.root / "resumed"
        proc = self.job("killed", out, kill_after=kill)
        if proc.returncode != -signal.SIGKILL:
            why = ("it ended before that step: the step count differs from the "
                   "uninterrupted run's" if proc.returncode == 0 else failure(proc))
            return Outcome("c", f"to be killed after step {kill} of {steps}", [why])
        run_dir = next(out.iterdir())
        kept = len(list((run_dir / "checkpoints").glob("*.pt")))  # each with a checksum
        done = sorted(ResultsStore(run_dir).finished_tasks())
        proc = self.job("resume", out)
        figure = (f"SIGKILLed after step {kill} of {steps} (tasks done {done}, {kept} "
                  f"phase checkpoint(s) left), relaunched")
        if proc.returncode != 0:
            return Outcome("c", figure, [f"the relaunched run failed: {failure(proc)}"])
        bad = [f"rows: {d}" for d in rows_differences(whole, run_dir, names=RESUMED)]
        bad += [f"blobs: {d}" for d in blob_differences(whole, run_dir, RESUMED)]
        rows = load_rows(whole)
        n_rows = int((~rows.metric.isin(TIMING_METRICS)).sum())
        return Outcome("c", f"{figure}: {n_rows} rows and {len(blobs(whole))} blobs "
                            f"{'identical' if not bad else 'compared'} to an uninterrupted run",
                       bad)


# -- (d) step cost ----------------------------------------------------------------------------
def check_step(spec: str, arch: str) -> Outcome:
    """Sync-prone ops and aten ops of a steady-state step, task 0 and a later task."""
    plain = profile_method(PLAIN, arch=arch, batch=STEP_BATCH, size=STEP_SIZE)
    parts, bad = [], []
    for phase in PHASES:
        counted = profile_method(spec, arch=arch, batch=STEP_BATCH, size=STEP_SIZE,
                                 phase=phase)
        where = {"first": "task 0", "later": "a later task"}[phase]
        parts.append(f"{where} {counted.syncs} syncs, {counted.ops} aten ops = "
                     f"{counted.ops / plain.ops:.2f}x plain")
        if counted.syncs:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(counted.sync_ops.items()))
            bad.append(f"{where}: {counted.syncs} host-sync-prone op(s) per steady-state step "
                       f"({ops})")
    return Outcome("d", "; ".join(parts) + f" (plain step: {plain.ops} aten ops; CUDA code "
                   f"path on CPU, batch {STEP_BATCH}, {STEP_SIZE}px)", bad)


# -- (e) settings -----------------------------------------------------------------------------
def check_settings(cls: type) -> Outcome:
    keys = {k for settings in cls.SETTINGS.values() for k in settings}
    return Outcome("e", f"{len(keys)} option(s) declared, each checked for a source and a "
                        f"range; an unknown option tried on {len(BENCHMARKS.names())} "
                        f"benchmarks", settings_violations(cls))


# -- the check ----------------------------------------------------------------------------------
def check_method(spec: str, *, quick: bool = False, arch: str = "resnet18",
                 benchmark: str | None = None, options: dict[str, Any] | None = None,
                 only: Sequence[str] | None = None, out: str | Path | None = None,
                 emit: Callable[[str], None] | None = None) -> Report:
    """Run the checks (``only``: a subset of :data:`CHECKS`' letters) on ``spec``; each
    line is also passed to ``emit`` as it is known. ``out``: keep the runs there (an empty
    or new folder); default a temporary folder, removed. Bad input raises one of
    :data:`benchmarks.exec.runs.CLI_ERRORS` before any work."""
    started = time.perf_counter()
    p = plan(spec, quick=quick, arch=arch, benchmark=benchmark, options=options, only=only)
    if out is not None and Path(out).exists() and (not Path(out).is_dir()
                                                   or any(Path(out).iterdir())):
        raise ValueError(f"--out {out}: give an empty or new folder (the check's runs must "
                         f"start afresh)")
    say = emit or (lambda _line: None)
    report = Report(spec, p.describe(quick))
    say(report.setup)

    def add(outcome: Outcome) -> None:
        report.outcomes.append(outcome)
        for line in outcome.lines():
            say(line)

    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="nws-conformance-"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file on the way, no permission: bad input, nothing run yet
        raise ValueError(f"--out {out}: cannot create that folder ({err.strerror or err}); "
                         f"give an empty or new folder") from err
    try:
        runs = Runs(p, root)
        if {"a", "b", "c"} & set(p.only):
            whole, why = runs.whole()
            for check, step in (("a", runs.fresh), ("b", lambda w: check_memory(p.cls, w)),
                                ("c", runs.resume)):
                if check in p.only:
                    add(step(whole) if whole else Outcome(check, "not run", [why]))
        if "d" in p.only:
            add(_guarded("d", lambda: check_step(spec, arch)))
        if "e" in p.only:
            add(_guarded("e", lambda: check_settings(p.cls)))
    finally:
        if out is None:
            shutil.rmtree(root, ignore_errors=True)
    report.seconds = time.perf_counter() - started
    say(report.verdict())
    return report


def _guarded(check: str, measure: Callable[[], Outcome]) -> Outcome:
    """A check whose measurement raised (the method's code, in this process) failed."""
    try:
        return measure()
    except Exception as err:
        return Outcome(check, "raised", [f"{type(err).__name__}: {err}"])


def assert_conforms(spec: str, **kwargs: Any) -> Report:
    """:func:`check_method` for tests: raises ``AssertionError`` with the report (each
    check's line and every violation) unless the method conforms; returns the report.

    >>> from benchmarks.perf.conformance import assert_conforms
    >>> def test_my_method_conforms():
    ...     assert_conforms("mypkg.methods:MyMethod", quick=True)
    """
    report = check_method(spec, **kwargs)
    if not report.ok:
        raise AssertionError(f"{spec} does not conform:\n{report.format()}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.check_method", description=__doc__.split("\n\n")[0],
        epilog="Exit 0: conforming; 1: violations (listed one per line); 2: bad input. "
               "See docs/checking-a-method.md.")
    parser.add_argument("spec", help="a registered method name (nws), a module path "
                                     "(package.module:Class) or an entry point's name")
    parser.add_argument("--quick", action="store_true",
                        help="synthetic data, 2 tasks (default: split_digits, 3 tasks)")
    parser.add_argument("--arch", default="resnet18", help="default: resnet18")
    parser.add_argument("--benchmark", default=None,
                        help="default: split_digits (synthetic with --quick)")
    parser.add_argument("--opt", action="append", metavar="KEY=VALUE",
                        help="method option, as for benchmarks.run")
    parser.add_argument("--only", default=None, metavar="a,b,...",
                        help="run these checks only: " + "; ".join(
                            f"{k}: {v}" for k, v in CHECKS.items()))
    parser.add_argument("--out", default=None,
                        help="keep the check's run folders here (an empty or new folder); "
                             "default: a temporary folder, removed")
    args = parser.parse_args(argv)
    only = None if args.only is None else [c.strip() for c in args.only.split(",") if c.strip()]
    if only == []:
        print(f"error: --only {args.only!r}: name at least one check ({', '.join(CHECKS)})",
              file=sys.stderr)
        return 2
    try:
        options = parse_pairs(args.opt, "--opt")
    except ValueError as bad:  # KEY=VALUE missing its "="
        print(f"error: {bad}", file=sys.stderr)
        return 2
    try:
        report = check_method(args.spec, quick=args.quick, arch=args.arch,
                              benchmark=args.benchmark, options=options, only=only,
                              out=args.out, emit=lambda ln: print(ln, flush=True))
    except CLI_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1
