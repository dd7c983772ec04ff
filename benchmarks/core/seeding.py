"""Independent random streams derived from (seed, task, epoch, stream name).

Every stream is a pure function of its coordinates, so a run resumed after task k draws
exactly what an uninterrupted run would have drawn: nothing depends on how much randomness
earlier tasks consumed.
"""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch

STREAMS = ("init", "order", "augment")


def derive_seed(seed: int, *coords: int | str) -> int:
    """A 63-bit seed from the run seed and any coordinates (task, epoch, stream name)."""
    text = ":".join(str(c) for c in (seed, *coords))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *coords: int | str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, *coords))
    return g


def seed_global(seed: int, *coords: int | str) -> None:
    """Seed torch, numpy and random (used for model init and augmentation)."""
    s = derive_seed(seed, *coords)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (bit-exact reruns on CPU; slower on GPU). cuDNN's autotuner
    is the device policy's decision (:meth:`benchmarks.core.device_policy.DevicePolicy.apply`),
    not this function's."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    torch.backends.cudnn.deterministic = enabled
