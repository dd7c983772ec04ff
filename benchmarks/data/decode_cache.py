"""Folder-tree images decoded once into a uint8 cache, for batches on the device.

Decoding CUB-to-Sketches' JPEGs is slow on CPU (measured: docs/performance.md, Data pipeline), and a
100-epoch run would decode every image 100 times. Here each image is decoded once, through the
deterministic first step of its transforms, into one ``(N, 3, S, S)`` uint8 array per data set and
split, saved as ``.npy`` (written to a temporary name, then renamed: a kill leaves no half file)
with a progress bar, and memory-mapped on later runs. Training then augments whole batches on the
device (:mod:`benchmarks.data.batches`).

What is cached (the first transform's output; one fixed shape per array):

- cropped sets (CUB, Cars): ``Resize((224, 224))``, exactly what the per-image path makes.
- the others (Flowers, WikiArt, Sketches): ``Resize(256)`` (shorter side 256) and then the
  **centre 256 x 256 square**. Images are not all of one aspect, and one tensor needs one
  shape; the square keeps the test transform exact (``CenterCrop(224)`` of the resized
  image lies inside it, at the same pixels) and the training crop's scale and aspect
  draws unchanged, but a training crop can no longer reach past the square along an
  image's long side (a 4:3 image loses 1/8 of its width on each side to the training
  crops). Resizing whole images to 256 x 256 would instead distort every test image.

The cache file's name carries a digest of the file list (paths, sizes, modification times)
and the size rule, so a changed tree builds a new cache. Location: ``cache_dir`` if given,
else ``<data root>/.nws_decoded/`` (a hidden folder, never a data set or class), else, where
the data root is read-only, ``~/.cache/nws_bench/decoded/``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from benchmarks.data.batches import BatchAugment, DeviceBatches, ResizedCropAugment
from nws.atomic import atomic_path

log = logging.getLogger(__name__)
CACHE_FOLDER = ".nws_decoded"


def default_cache_dir(data_root: Path) -> Path:
    """``<data root>/.nws_decoded`` when writable, else ``~/.cache/nws_bench/decoded``."""
    folder = Path(data_root) / CACHE_FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return folder
    except OSError:
        return Path.home() / ".cache" / "nws_bench" / "decoded"


class DecodedImages(Dataset):
    """A folder data set (``samples``: [(path, label)], per-image ``__getitem__`` with its
    transforms: the DataLoader path) plus its images decoded once at ``size`` x ``size`` by
    ``first_step`` (a PIL -> PIL function), built lazily on first use of :meth:`on_device`.
    Every other attribute is the folder data set's."""

    def __init__(self, folder: Any, first_step: Callable, size: int,
                 augment: BatchAugment | ResizedCropAugment, cache_dir: Path | None,
                 name: str, data_root: Path | None = None, progress: bool | None = None
                 ) -> None:
        self.folder, self.first_step, self.size = folder, first_step, size
        self.batch_augment, self.cache_dir, self.name = augment, cache_dir, name
        self.data_root = data_root
        # None: a bar only on a terminal, as the CLI's (in a job's log it would be a stream of
        # carriage-return frames); build_cache logs one line either way
        self.progress = sys.stderr.isatty() if progress is None else progress
        self._images: np.ndarray | None = None
        self._on_device: DeviceBatches | None = None

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        return self.folder[i]

    def __getattr__(self, name: str) -> Any:
        if name == "folder":  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.folder, name)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.folder.samples], dtype=torch.long)

    def cache_path(self) -> Path:
        digest = hashlib.sha256()
        digest.update(f"{self.size}:{self.first_step!r}".encode())
        for path, label in self.folder.samples:
            st = os.stat(path)
            digest.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        if self.cache_dir is None:  # decided on first use, not when the benchmark is listed
            self.cache_dir = default_cache_dir(self.data_root or Path.cwd())
        return Path(self.cache_dir) / f"{self.name}-{self.size}-{digest.hexdigest()[:16]}.npy"

    def images(self) -> np.ndarray:
        """The decoded images (N, 3, size, size) uint8, memory-mapped; built if absent."""
        if self._images is None:
            path = self.cache_path()
            if not path.is_file():
                build_cache(self.folder.samples, self.first_step, self.size, path,
                            desc=f"decoding {self.name} once", progress=self.progress,
                            load=getattr(self.folder, "loader", None))
            self._images = np.load(path, mmap_mode="r")
        return self._images

    def on_device(self, device: torch.device, crop_resample: str = "batched") -> DeviceBatches:
        cached = self._on_device
        if cached is None or not cached.serves(device, crop_resample):
            images = torch.from_numpy(np.array(self.images()))  # read into memory
            self._on_device = DeviceBatches(images, self.labels, self.batch_augment, device,
                                            crop_resample)
        return self._on_device


def decode(path: str, first_step: Callable, size: int,
           load: Callable[[str], Any] | None = None) -> np.ndarray:
    """One image as (3, size, size) uint8 after ``first_step``; the path in any error.
    ``load`` (path -> RGB PIL image) is the folder's own loader where it has one: the
    suite's names the file and its task on failure (CLI exit 2)."""
    from PIL import Image

    if load is not None:
        out = np.asarray(first_step(load(path)), dtype=np.uint8)
    else:
        try:
            with Image.open(path) as img:
                out = np.asarray(first_step(img.convert("RGB")), dtype=np.uint8)
        except OSError as err:
            raise OSError(f"cannot decode {path}: {err}") from err
    if out.shape != (size, size, 3):
        raise ValueError(f"{path}: first transform gave {out.shape}, expected "
                         f"({size}, {size}, 3)")
    return out.transpose(2, 0, 1)


def build_cache(samples: list[tuple[str, int]], first_step: Callable, size: int, path: Path,
                desc: str = "decoding", progress: bool = True,
                load: Callable[[str], Any] | None = None) -> None:
    """Decode every sample into ``path`` (.npy, (N, 3, size, size) uint8), atomically."""
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(samples), 3, size, size))
        for i, (file, _) in enumerate(tqdm(samples, desc=desc, unit="img",
                                           disable=not progress, dynamic_ncols=True)):
            out[i] = decode(file, first_step, size, load)
        out.flush()
        del out
    log.info("decoded %d images into %s", len(samples), path)
