"""GPU acceptance check (issue 13): one command for anyone with a CUDA GPU.

    python -m benchmarks.gpu_check                      # = tox -e gpu; all checks on cuda
    python -m benchmarks.gpu_check --device cpu --batch 4 --size 16 --steps 2 --warmup 1 \\
        --amp fp32 --compile off --resume-images 64     # dry run of the same code on CPU

Checks, each reported PASS / FAIL / SKIP (exit status 1 if any fails, 2 on bad input):

1. ``task``: every method learns one task of CIFAR-shaped synthetic data through the
   harness (train, finish, store, rebuild, evaluate; ``smoke`` protocol) under every
   ``--amp`` (fp32, bf16, fp16 AMP; AQD turns fp16 into bf16 itself).
2. ``steps``: per method, AMP mode and compile mode, ``--warmup`` steps of ``Trainer.step``
   and then ``--steps`` steady-state steps under ``torch.cuda.set_sync_debug_mode("error")``
   (any host sync raises), timed as steps/s (synthetic batches already on the device: the
   training step alone, no data loading). On CPU the sync check is ``OpCounter``'s count of
   sync-prone ops over one step of the CUDA code path (NWS: ``NWS_SEARCH=full``, no
   compiled CPU kernels) instead.
3. ``search``: NWS's indices after a training step equal a float64 brute-force nearest
   entry for every row (a mismatch whose two float64 distances differ by less than 1e-6
   relative is a tie, reported but not a failure).
4. ``resume``: the harness CLI (``python -m benchmarks.run``, PackNet, synthetic data,
   ``--checkpoint-every 1 --deterministic``) is killed (SIGKILL) once its first epoch
   checkpoint exists, then rerun with the same command: it must resume from the checkpoint,
   train steps after it, and end with the accuracy, step count and final training loss of
   the same command run uninterrupted.

Then a table of steps/s per method (eager / compiled) and the projected wall time of the
paper protocol on Split-CIFAR-100 (20 tasks x 100 epochs x 79 steps per method, plus
PackNet's 30 retraining epochs per task; 5 methods x 3 seeds): training steps only, at the
measured fp32 steps/s (data loading, evaluation and checkpoints excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.methods.table import METHODS
from benchmarks.perf.opcount import OpCounter
from benchmarks.perf.profile import (
    STEP_FLOORS,
    build_method,
    build_trainer,
    cuda_code_path,
    require_at_least,
    synthetic_batch,
)
from nws.atomic import atomic_write_text

AMP = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
PAPER_TASKS, PAPER_EPOCHS, PAPER_STEPS, PAPER_SEEDS = 20, 100, 79, 3  # Split-CIFAR-100
PAPER_BATCH, PAPER_SIZE = 32, 32  # its batch and image side (protocols.py)
PACKNET_RETRAIN_EPOCHS = 30  # docs/reference.md §4
TIE_RTOL = 1e-6
NWS_SETUP = {"kmeans_iters": 2, "kmeans_points": 2048}  # pools are setup here, not checked


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str = ""


@dataclass
class Timing:
    method: str
    amp: str
    compiled: bool
    steps_per_s: float | None  # None: the case failed
    syncs_ok: bool
    error: str = ""


@dataclass
class Report:
    device: str
    checks: list[Check] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)

    def add(self, name: str, status: str, detail: str = "") -> None:
        self.checks.append(Check(name, status, detail))
        print(f"[{status}] {name}" + (f": {detail}" if detail else ""), flush=True)

    @property
    def failed(self) -> bool:
        return any(c.status == "FAIL" for c in self.checks)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


# -- 1. one task per method through the harness -------------------------------------------


def check_tasks(report: Report, methods: Sequence[str], amps: Sequence[str],
                device: torch.device, size: int, out: Path) -> None:
    from benchmarks.engine.harness import RunConfig, run

    for method in methods:
        for amp in amps:
            name = f"task {method} {amp}"
            try:
                run(RunConfig(method=method, benchmark="synthetic", protocol="smoke",
                              pretrained="none", num_tasks=1, device=str(device),
                              out=str(out / "tasks"), progress=False,
                              protocol_overrides={"amp": AMP[amp]},
                              method_options=NWS_SETUP if method == "nws" else {},
                              benchmark_options={"size": size, "num_tasks": 1}))
                report.add(name, "PASS")
            except Exception as err:  # report and go on: the other cases still tell
                report.add(name, "FAIL", _error(err))


# -- 2. steady-state steps: syncs and speed -----------------------------------------------


@contextlib.contextmanager
def sync_errors(device: torch.device) -> Iterator[None]:
    """Any host sync raises inside (CUDA); a no-op elsewhere (the op count checks there)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(method: str, amp: str, compiled: bool, device: torch.device, *, arch: str,
               batch: int, size: int, warmup: int, steps: int) -> Timing:
    """Steps/s of ``steps`` steady-state steps after ``warmup``, with the sync check."""
    torch.manual_seed(0)
    path = contextlib.nullcontext() if device.type == "cuda" else cuda_code_path("full")
    with path, tempfile.TemporaryDirectory() as tmp:
        m = build_method(method, arch, device, overrides={"amp": AMP[amp]})
        trainer = build_trainer(m, Path(tmp), compile=compiled)
        x, y = synthetic_batch(batch, size, device)
        for _ in range(warmup):
            trainer.step(x, y)
        syncs_ok, error = True, ""
        if device.type != "cuda":
            with OpCounter() as ops:
                trainer.step(x, y)
            syncs_ok = ops.syncs == 0
            error = ", ".join(f"{k} x{v}" for k, v in sorted(ops.sync_ops.items()))
        _synchronize(device)
        start = time.perf_counter()
        with sync_errors(device):
            for _ in range(steps):
                loss = trainer.step(x, y)
        _synchronize(device)
        seconds = time.perf_counter() - start
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"loss {float(loss)} after {warmup + steps} steps")
        return Timing(method, amp, compiled, steps / seconds, syncs_ok, error)


def check_steps(report: Report, methods: Sequence[str], amps: Sequence[str],
                compile_modes: Sequence[bool], device: torch.device, **kw: Any) -> None:
    for method in methods:
        for amp in amps:
            for compiled in compile_modes:
                name = f"steps {method} {amp}{' compiled' if compiled else ''}"
                try:
                    t = time_steps(method, amp, compiled, device, **kw)
                except Exception as err:
                    t = Timing(method, amp, compiled, None, False, _error(err))
                    if compiled:  # a compile failure makes no eager number wrong
                        torch._dynamo.reset()
                report.timings.append(t)
                if t.steps_per_s is None:
                    report.add(name, "FAIL", t.error)
                elif not t.syncs_ok:
                    report.add(name, "FAIL", f"host sync inside a steady-state step: {t.error}")
                else:
                    # a dispatch mode (the op counter) makes dynamo run the step eagerly:
                    # off CUDA a compiled step's sync count is that of the eager ops
                    how = ("" if not compiled or device.type == "cuda" else
                           " (counted on the eager ops: the compiled graph is not counted)")
                    report.add(name, "PASS", f"{t.steps_per_s:.3g} steps/s, no host sync{how}")


# -- 3. NWS indices against float64 brute force -------------------------------------------


def brute_force(rows: torch.Tensor, pool: torch.Tensor, chunk: int = 1 << 16
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest pool entry of each row, the pool in float64): Euclidean distances in
    float64, ``chunk`` rows at a time (the rows x entries matrix is never whole)."""
    pool64 = pool.double()
    best = torch.empty(len(rows), dtype=torch.long, device=rows.device)
    for start in range(0, len(rows), chunk):
        r = rows[start:start + chunk].double()
        best[start:start + chunk] = torch.cdist(r, pool64).argmin(1)
    return best, pool64


def check_search(report: Report, device: torch.device, *, arch: str, batch: int, size: int,
                 max_rows: int | None) -> None:
    import nws

    torch.manual_seed(0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = build_trainer(build_method("nws", arch, device), Path(tmp))
            trainer.step(*synthetic_batch(batch, size, device))
            checked = mismatched = ties = 0
            for name, layer in nws.nws_layers(trainer.model).items():
                rows = layer.rows().detach()[:max_rows]
                got = layer.indices().reshape(-1)[:max_rows].long().to(rows.device)
                want, pool64 = brute_force(rows, layer.pool)
                bad = (got != want).nonzero().squeeze(1)
                if len(bad):
                    r = rows[bad].double()
                    d_got = (r - pool64[got[bad]]).square().sum(1)
                    d_want = (r - pool64[want[bad]]).square().sum(1)
                    tie = (d_got - d_want).abs() <= TIE_RTOL * d_want.clamp_min(1e-30)
                    ties += int(tie.sum())
                    mismatched += int((~tie).sum())
                    if (~tie).any():
                        print(f"  {name}: {int((~tie).sum())} rows off the nearest entry")
                checked += len(rows)
        detail = f"{checked} rows in float64: {mismatched} wrong, {ties} ties"
        report.add("search nws vs float64 brute force", "FAIL" if mismatched else "PASS",
                   detail)
    except Exception as err:
        report.add("search nws vs float64 brute force", "FAIL", _error(err))


# -- 4. kill and resume through the CLI ---------------------------------------------------


RESUMED = re.compile(r"resumed after epoch (\d+)/(\d+) \(step (\d+)\)")
COMPARED = ("accuracy", "train_steps", "final_train_loss")  # what a resume must not change


def _resume_command(device: torch.device, folder: Path, size: int, images: int) -> list[str]:
    """The harness CLI run of the resume check: PackNet on synthetic data, a checkpoint after
    every epoch (so a kill lands mid-phase), deterministic kernels (so a resumed run can be
    compared with an uninterrupted one value for value)."""
    return [sys.executable, "-m", "benchmarks.run", "--method", "packnet", "--benchmark",
            "synthetic", "--protocol", "quick", "--tasks", "1", "--pretrained", "none",
            "--device", str(device), "--out", str(folder), "--no-progress",
            "--checkpoint-every", "1", "--deterministic",
            "--bench-opt", f"size={size}", "--bench-opt", f"n_train={images}",
            "--bench-opt", "num_tasks=1"]


def _rows(folder: Path) -> dict[tuple[Any, ...], float]:
    from benchmarks.core.results import load_rows

    rows = load_rows(folder)
    rows = rows[rows.metric.isin(COMPARED)]
    return {(r.metric, r.task, r.after_task): float(r.value) for r in rows.itertuples()}


def check_resume(report: Report, device: torch.device, out: Path, *, size: int,
                 images: int, timeout: float = 600) -> None:
    """Start the harness CLI, SIGKILL it once its first epoch checkpoint exists, rerun it;
    then run the same command uninterrupted. PASS when the rerun resumed from a checkpoint,
    trained steps after it (> 0: the kill landed before the task's training ended), and its
    accuracy, training steps and final training loss equal the uninterrupted run's."""
    folder = out / "resume"
    cmd = _resume_command(device, folder / "killed", size, images)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(__file__).resolve().parent.parent.parent), os.environ.get("PYTHONPATH")]))}
    name = "resume after SIGKILL (harness CLI, packnet)"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if any(not f.name.startswith(".") for f in folder.glob("killed/*/checkpoints/*")):
            break  # a complete checkpoint (written under a hidden name, then renamed)
        time.sleep(0.02)
    if proc.poll() is not None:
        err = proc.stderr.read().decode(errors="replace")[-500:] if proc.stderr else ""
        report.add(name, "FAIL", f"the run ended (rc {proc.returncode}) before a checkpoint "
                   f"could be killed; raise --resume-images. {err}")
        return
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if again.returncode != 0:
        report.add(name, "FAIL", f"rerun exited {again.returncode}: {again.stderr[-800:]}")
        return
    restored = [int(m.group(3)) for m in RESUMED.finditer(again.stderr)]
    resumed = _rows(folder / "killed")
    if not restored or resumed.get(("train_steps", 0, 0), 0) <= max(restored):
        report.add(name, *resume_verdict(restored, resumed, {}))
        return
    reference = subprocess.run(_resume_command(device, folder / "uninterrupted", size, images),
                               env=env, capture_output=True, text=True, timeout=timeout)
    if reference.returncode != 0:
        report.add(name, "FAIL", f"the uninterrupted run exited {reference.returncode}: "
                   f"{reference.stderr[-800:]}")
        return
    report.add(name, *resume_verdict(restored, resumed, _rows(folder / "uninterrupted")))


def resume_verdict(restored: list[int], resumed: dict[tuple[Any, ...], float],
                   uninterrupted: dict[tuple[Any, ...], float]) -> tuple[str, str]:
    """PASS / FAIL and why, for a rerun that logged resuming at the steps ``restored`` (one
    per phase resumed) and stored ``resumed``, against the uninterrupted run's rows (both
    keyed by (metric, task, after_task); task 0's ``train_steps`` counts every step)."""
    if not restored:
        return "FAIL", "rerun finished but did not resume from a checkpoint"
    total = resumed.get(("train_steps", 0, 0))
    after = None if total is None else int(total) - max(restored)
    if after is None or after <= 0:
        return "FAIL", (f"the rerun resumed at step {max(restored)} but trained {after} steps "
                        f"after it (task total {total}): it did not resume mid-training")
    differ = {k: (resumed.get(k), uninterrupted.get(k))
              for k in set(resumed) | set(uninterrupted) if resumed.get(k) != uninterrupted.get(k)}
    if differ:
        return "FAIL", (f"the resumed run differs from the uninterrupted run ((metric, task, "
                        f"after_task): (resumed, uninterrupted)): {differ}")
    return "PASS", (f"killed after an epoch checkpoint; the rerun resumed at step "
                    f"{max(restored)}, trained {after} more and equals the uninterrupted run "
                    f"({', '.join(COMPARED)})")


# -- table and projection -----------------------------------------------------------------


def paper_steps(method: str) -> int:
    """Training steps of one seed of the paper protocol on Split-CIFAR-100."""
    epochs = PAPER_EPOCHS + (PACKNET_RETRAIN_EPOCHS if method == "packnet" else 0)
    return PAPER_TASKS * epochs * PAPER_STEPS


def table(report: Report, batch: int = PAPER_BATCH, size: int = PAPER_SIZE) -> str:
    """The steps/s table and the projected paper-protocol wall time: for each compile mode
    that was timed (an untimed mode is left out, not filled in from the other), and flagged
    as no projection when the steps were timed at another batch or image size than the
    protocol's (``batch``, ``size``: those of the timed steps)."""
    rate = {(t.method, t.amp, t.compiled): t.steps_per_s for t in report.timings}
    methods = list(dict.fromkeys(t.method for t in report.timings))
    amps = list(dict.fromkeys(t.amp for t in report.timings))

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.3g}"

    lines = ["| method | amp | steps/s eager | steps/s compiled |", "|---|---|---|---|"]
    for m in methods:
        for a in amps:
            if (m, a, False) in rate or (m, a, True) in rate:
                lines.append(f"| {m} | {a} | {cell(rate.get((m, a, False)))} | "
                             f"{cell(rate.get((m, a, True)))} |")
    amp = "fp32" if "fp32" in amps else (amps[0] if amps else "fp32")
    timed = {t.compiled for t in report.timings}
    totals = []
    for compiled, label in ((False, "eager"), (True, "compiled where it ran")):
        if compiled not in timed:
            continue
        hours = 0.0
        for m in methods:
            r = rate.get((m, amp, compiled)) or rate.get((m, amp, False))
            if not r:
                hours = math.nan
                break
            hours += PAPER_SEEDS * paper_steps(m) / r / 3600
        totals.append(f"{label} {hours:.2f} h")
    caveat = ("" if (batch, size) == (PAPER_BATCH, PAPER_SIZE) else
              f"; timed at batch {batch}, {size}x{size}, not the protocol's batch {PAPER_BATCH}"
              f", {PAPER_SIZE}x{PAPER_SIZE}: not a projection of the protocol")
    lines += ["", f"Projected paper protocol, Split-CIFAR-100 ({', '.join(methods)} x "
              f"{PAPER_SEEDS} seeds, {amp}, training steps only): {', '.join(totals)}{caveat}"]
    return "\n".join(lines)


# -- CLI ----------------------------------------------------------------------------------


def _parse_list(spec: str, valid: Sequence[str], what: str) -> list[str]:
    names = list(valid) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid: {', '.join(valid)} or all")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (dry run)")
    p.add_argument("--method", default="all", help="a,b,... or all")
    p.add_argument("--amp", default="all", help="fp32,bf16,fp16 or all (CPU: fp32 only)")
    p.add_argument("--compile", choices=("off", "on", "both"), default="both",
                   help="time steps without / with torch.compile (both: the table's columns)")
    p.add_argument("--compile-amp", default="fp32",
                   help="AMP modes also run compiled (compiling is slow; default fp32)")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5, help="uncounted steps (CUDA graphs: >= 3)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per case")
    p.add_argument("--skip", default="", help="checks to skip: task,steps,search,resume")
    p.add_argument("--search-rows", type=int, default=None,
                   help="rows per NWS layer checked against float64 (default all)")
    p.add_argument("--resume-images", type=int, default=4096,
                   help="synthetic training images of the resume run (enough to kill it "
                        "during its first task)")
    p.add_argument("--out", default=None, help="folder for run folders and report.json "
                                               "(default: a temporary folder)")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
        methods = _parse_list(args.method, METHODS.names(), "method")
        amps = _parse_list(args.amp, list(AMP), "amp")
        compile_amps = _parse_list(args.compile_amp, list(AMP), "amp")
        skip = set(_parse_list(args.skip, ["task", "steps", "search", "resume"], "check")
                   if args.skip else [])
    except (ValueError, RuntimeError) as err:
        p.exit(2, f"{p.prog}: error: {err}\n")
    require_at_least(p, args, STEP_FLOORS | {"steps": 1, "resume_images": 2})
    if device.type == "cuda" and not torch.cuda.is_available():
        p.exit(2, f"{p.prog}: error: no CUDA device is visible; run the dry check with "
                  f"--device cpu\n")
    if device.type != "cuda" and amps != ["fp32"]:
        print("note: AMP applies on CUDA only; the CPU dry run checks fp32", flush=True)
        amps = ["fp32"]
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]

    report = Report(str(device))
    with contextlib.ExitStack() as stack:
        out = Path(args.out) if args.out else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="gpu_check-")))
        out.mkdir(parents=True, exist_ok=True)
        print(f"# gpu_check on {device} "
              f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
              f"torch {torch.__version__}", flush=True)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("task", lambda: check_tasks(report, methods, amps, device, args.size, out)),
            ("steps", lambda: [check_steps(
                report, methods, [a for a in amps if not c or a in compile_amps], [c], device,
                arch=args.arch, batch=args.batch, size=args.size, warmup=args.warmup,
                steps=args.steps) for c in modes]),
            ("search", lambda: check_search(report, device, arch=args.arch, batch=args.batch,
                                            size=args.size, max_rows=args.search_rows)
             if "nws" in methods else report.add("search", "SKIP", "nws not selected")),
            ("resume", lambda: check_resume(report, device, out, size=args.size,
                                            images=args.resume_images)),
        ]
        for key, run_check in steps:
            if key in skip:
                report.add(key, "SKIP", "--skip")
            else:
                run_check()
        if report.timings:
            print("\n" + table(report, args.batch, args.size))
        atomic_write_text(out / "report.json", json.dumps(asdict(report), indent=1))
    failed = [c.name for c in report.checks if c.status == "FAIL"]
    print(f"\n{len(report.checks) - len(failed)} of {len(report.checks)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
