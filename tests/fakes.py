"""Small data sets written in the real on-disk formats, for tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from benchmarks.data.split_cifar100 import SUPERCLASSES


def write_cifar100_python(root: Path, per_class: dict[str, int] | None = None,
                          swap: tuple[str, str] | None = None) -> Path:
    """CIFAR-100's python release (meta, train, test pickles) with a few images per class.

    Fine and coarse label indices follow the real release (alphabetical names). ``swap``
    gives two fine classes whose coarse labels are exchanged, to fake a corrupted copy.
    """
    per_class = per_class or {"train": 3, "test": 2}
    fine_names = sorted(f for fs in SUPERCLASSES.values() for f in fs)
    coarse_names = sorted(SUPERCLASSES)
    coarse_of = {f: coarse_names.index(s) for s, fs in SUPERCLASSES.items() for f in fs}
    if swap:
        a, b = swap
        coarse_of[a], coarse_of[b] = coarse_of[b], coarse_of[a]
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, fh)
    for split, n in per_class.items():
        fine = [i for i in range(100) for _ in range(n)]
        rng.shuffle(fine)
        data = np.zeros((len(fine), 3072), dtype=np.uint8)
        for row, f in enumerate(fine):  # first pixel encodes the fine label, for checking
            data[row] = rng.integers(0, 256, 3072)
            data[row, 0] = f
        raw = {
            "filenames": [f"img_{i}.png" for i in range(len(fine))],
            "batch_label": f"{split} batch",
            "fine_labels": fine,
            "coarse_labels": [coarse_of[fine_names[f]] for f in fine],
            "data": data,
        }
        with open(folder / split, "wb") as fh:
            pickle.dump(raw, fh)
    return root


def write_image_folder(root: Path, classes: list[str], n: int = 1, size: int = 8) -> None:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = np.full((size, size, 3), (hash(c) + i) % 256, dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


# The learning checks run split_digits at 16x16 (the 8x8 digits lose nothing): every
# convolution is 4x cheaper than at 32, and each method's check took less time, NWS's aside
# (its cost is the weight search, not the convolutions); measured: docs/performance.md, The
# quick start. AQD stays at 32: its 2-bit activations lose too much at 16 (task digits_23
# reached 89.2%; the mini's last task 76.3%).
DIGITS_TEST_SIZE = 16

# The "learns split_digits" bars (issue 21, item 1): every task's accuracy from the store is
# at least LEARNS_TASK_BAR and their mean at least LEARNS_MEAN_BAR. A task has two classes, so
# chance is 0.50 (a model that learned nothing fails both); the bars sit far below every value
# measured, because those move with the CPU: another instruction set or thread count sums
# floats in another order, and a few epochs from scratch then end elsewhere (on an AVX2-only
# AMD EPYC with 2 cores Finetune's digits_23 reached 88.3% against this machine's 96.7%; the
# old bar of 0.90 on every task failed there), and one task of a run can fall far below the
# others (Finetune, seed 1996: digits_45 78.5%, the other tasks >= 96.7%). Each test says what
# was measured for it: per run, the lowest task and the mean over tasks from the store, over
# seeds x ATEN_CPU_CAPABILITY {avx2, default} x torch threads {1, 2}, measured 2026-12-03 on
# the project's 2-core AMD EPYC dev machine (AVX-512) under load. Over all 13 runs of the 5
# methods: lowest task 78.5%, lowest mean 94.5%.
LEARNS_TASK_BAR = 0.65
LEARNS_MEAN_BAR = 0.85


def assert_learned(accuracies: pd.Series) -> None:
    """Every task's accuracy (fractions, one per task) >= LEARNS_TASK_BAR, their mean >=
    LEARNS_MEAN_BAR (see above)."""
    values = pd.Series(accuracies, dtype=float)
    assert (values >= LEARNS_TASK_BAR).all() and values.mean() >= LEARNS_MEAN_BAR, (
        f"bars: each task >= {LEARNS_TASK_BAR}, mean >= {LEARNS_MEAN_BAR}", values.to_dict())


def final_accuracies(run_dir: Path, num_tasks: int) -> pd.Series:
    """Each task's accuracy (fraction, by task name) from the store after the run's last
    task; asserts there is one per task."""
    from benchmarks.core.results import load_rows

    df = load_rows(run_dir)
    final = df[(df.metric == "accuracy") & (df.after_task == num_tasks - 1)]
    assert len(final) == num_tasks, final
    return final.set_index("task_name").value


def assert_stored_equals_formula(run_dir: Path, method_cls: type):
    """The run's store equals ``method_cls.memory_formula`` (its architecture, class counts
    and options) blob by blob, shared and per task; returns the formula (a Breakdown)."""
    from benchmarks.perf.conformance_diff import run_memory

    formula, stored = run_memory(method_cls, run_dir)
    assert stored == formula  # every blob, shared and per task
    return formula


def learn_split_digits(method: str, out: Path, num_tasks: int = 5,
                       size: int = DIGITS_TEST_SIZE) -> Path:
    """One seed of ``method`` on split_digits (quick protocol, no pretraining) at
    ``size`` pixels: the run the "learns split_digits" tests check (see ``DIGITS_TEST_SIZE``).
    Returns the run folder."""
    from benchmarks.engine.harness import RunConfig, run

    return run(RunConfig(method=method, benchmark="split_digits", protocol="quick",
                         pretrained="none", num_tasks=num_tasks, out=str(out),
                         benchmark_options={"size": size}, progress=False))
