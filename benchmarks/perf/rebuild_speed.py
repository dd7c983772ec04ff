"""Time of rebuilding a stored model for evaluation (the harness does it for every task j <= t
after each task t: 210 times per 20-task run), with and without the random init, in
interleaved rounds in one process.

    python -m benchmarks.perf.rebuild_speed [--arch resnet18] [--method packnet] [--rounds 5]

The store is written directly (no training): PackNet's shared backbone and owner ids of a
20-task run (5 bits per weight, ids drawn at random), and one task's BN and head.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.core.protocols import resolve_protocol
from benchmarks.core.store import ArtifactStore
from benchmarks.engine.harness import rebuild
from benchmarks.methods.contract import MethodContext, TaskInfo
from benchmarks.methods.table import METHODS
from benchmarks.models import archs

TASKS = 20


def packnet_store(folder: Path, arch: str) -> tuple[object, TaskInfo, ArtifactStore]:
    """A PackNet method object and a store holding what a 20-task run stores."""
    from baselines.packnet import OWNERS
    from benchmarks.methods.common import BACKBONE, conv_weight_state, task_state
    from nws import bitpack

    tasks = tuple(TaskInfo(t, f"t{t}", 5) for t in range(TASKS))
    ctx = MethodContext(arch, "split_cifar100", tasks, resolve_protocol("paper",
                        "split_cifar100"), torch.device("cpu"), 0,
                        archs.Pretrained(arch, "none"),
                        METHODS.get("packnet").resolve_options("split_cifar100", {}))
    method = METHODS.get("packnet")(ctx)
    model = archs.build(arch, 5)
    weights = conv_weight_state(model)
    n = sum(w.numel() for w in weights.values())
    ids = np.random.default_rng(0).integers(0, TASKS + 1, n)
    store = ArtifactStore(folder)
    bits = bitpack.bits_for(TASKS + 1)
    with store.transaction() as tx:
        tx.put(OWNERS, bitpack.pack(ids, bits), task=None, codec="bitpack",
               meta={"bits": bits, "count": int(n)})
        tx.put_tensors(BACKBONE, {k: w.clone() for k, w in weights.items()}, task=None)
        tx.put_tensors("state", task_state(model, arch), task=0)
    return method, tasks[0], store


def measure(arch: str = "resnet18", rounds: int = 5) -> dict[str, float]:
    """Median seconds of ``load_task`` with its random init and of :func:`rebuild`."""
    with tempfile.TemporaryDirectory() as tmp:
        method, task, store = packnet_store(Path(tmp), arch)
        with_init, without = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            method.load_task(task, store)
            with_init.append(time.perf_counter() - start)
            start = time.perf_counter()
            rebuild(method, task, store)
            without.append(time.perf_counter() - start)
    return {"load_task_with_init_s": statistics.median(with_init),
            "rebuild_s": statistics.median(without)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf.rebuild_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    out = measure(args.arch, args.rounds)
    print(f"PackNet {args.arch}, {TASKS}-task store: load_task with random init "
          f"{out['load_task_with_init_s']:.3f} s | rebuild without init "
          f"{out['rebuild_s']:.3f} s (median of {args.rounds}, torch threads "
          f"{torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
