"""CUB-to-Sketches: five fine-grained ImageFolder trees learned in order (docs/reference.md §3).

Expected under the data root (the Piggyback release; it cannot be downloaded by script)::

    cubs_cropped/{train,test}/<class>/<image>          CUB-200-2011, 200 classes
    stanford_cars_cropped/{train,test}/<class>/...     Stanford Cars, 196 classes
    flowers/{train,test}/<class>/...                   Flowers-102, 102 classes
    wikiart/{train,test}/<class>/...                   WikiArt, 195 classes
    sketches/{train,test}/<class>/...                  Sketches, 250 classes

Classes and samples follow the listing rule of :mod:`benchmarks.data.files` (hidden entries
and non-image files are never classes or samples), and every image is checked (by header, or
fully with ``--bench-opt verify=full``) before any training.
A missing or incomplete tree stops before any training with a message naming every problem.
A class count that differs from the release is reported as a warning (the run goes on and
its config records the counts found), since such a run is not comparable with the paper.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torchvision import transforms as T

from benchmarks.data.base import Benchmark, DataUnavailableError, Task
from benchmarks.data.batches import BatchAugment, ResizedCropAugment
from benchmarks.data.decode_cache import DecodedImages
from benchmarks.data.files import (
    ImageTree,
    TreeListing,
    list_tree,
    unreadable_images,
    unreadable_message,
)
from benchmarks.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Cutout

log = logging.getLogger(__name__)

# (folder, expected classes, cropped?) in task order.
DATASETS: list[tuple[str, int, bool]] = [
    ("cubs_cropped", 200, True),
    ("stanford_cars_cropped", 196, True),
    ("flowers", 102, False),
    ("wikiart", 195, False),
    ("sketches", 250, False),
]


def list_trees(root: Path) -> dict[tuple[str, str], TreeListing]:
    """(data set, split) -> its listing by the rule of :mod:`benchmarks.data.files`, for
    every split folder that exists."""
    return {(name, split): list_tree(root / name / split)
            for name, _, _ in DATASETS for split in ("train", "test")
            if (root / name / split).is_dir()}


def check_layout(root: Path, listings: dict[tuple[str, str], TreeListing] | None = None
                 ) -> list[str]:
    """Every problem with the trees under ``root`` (empty when the layout is complete)."""
    listings = list_trees(root) if listings is None else listings
    problems = []
    for name, _, _ in DATASETS:
        for split in ("train", "test"):
            folder = root / name / split
            if (name, split) not in listings:
                problems.append(f"missing folder {folder}")
                continue
            tree = listings[name, split]
            if not tree.classes:
                problems.append(f"{folder} has no class folders")
            elif len(tree.classes) == 1:  # e.g. <split>/images/<class>/: one class of all
                problems.append(f"{folder} has one class folder ({tree.classes[0]!r}); a task "
                                f"needs >= 2: is there an extra folder level? (expected "
                                f"{folder}/<class>/<images>)")
            empty = tree.empty_classes()
            if empty:
                problems.append(f"{folder}: class folders without images: {sorted(empty)[:5]}")
        train, test = listings.get((name, "train")), listings.get((name, "test"))
        if train is not None and test is not None and train.classes != test.classes:
            diff = sorted(set(train.classes) ^ set(test.classes))
            problems.append(f"{root / name}: train and test class folders differ: {diff[:5]}")
    return problems


def transforms(cropped: bool) -> tuple[T.Compose, T.Compose]:
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if cropped:
        train = [T.Resize((224, 224)), T.RandomHorizontalFlip(), *norm, Cutout(16)]
        test = [T.Resize((224, 224)), *norm]
    else:
        train = [T.Resize(256), T.RandomResizedCrop(224), T.RandomHorizontalFlip(), *norm,
                 Cutout(16)]
        test = [T.Resize(256), T.CenterCrop(224), *norm]
    return T.Compose(train), T.Compose(test)


def first_step(cropped: bool) -> tuple[T.Compose | T.Resize, int]:
    """The deterministic start of both transforms, cached once per image, and its size
    (:mod:`benchmarks.data.decode_cache` says why the uncropped sets keep a centre square)."""
    if cropped:
        return T.Resize((224, 224)), 224
    return T.Compose([T.Resize(256), T.CenterCrop(256)]), 256


def batch_transforms(cropped: bool) -> tuple[BatchAugment | ResizedCropAugment, BatchAugment]:
    """:func:`transforms` on whole batches of cached images (train, test)."""
    if cropped:
        return (BatchAugment(IMAGENET_MEAN, IMAGENET_STD, flip=True, cutout=16),
                BatchAugment(IMAGENET_MEAN, IMAGENET_STD))
    return (ResizedCropAugment(IMAGENET_MEAN, IMAGENET_STD, size=224, flip=True, cutout=16),
            BatchAugment(IMAGENET_MEAN, IMAGENET_STD, center=224))


def build(data_root: Path, verify: str = "header", cache_dir: str | None = None) -> Benchmark:
    """The five tasks; ``verify`` (``none | header | full``, :mod:`benchmarks.data.files`)
    says how every image is checked before any training. With data on the device (the
    default), each split's images are decoded once into ``cache_dir`` on first use (default:
    ``<data root>/.nws_decoded``, see :mod:`benchmarks.data.decode_cache`;
    ``--bench-opt cache_dir=DIR``)."""
    root = Path(data_root).expanduser().resolve()
    cache = Path(cache_dir).expanduser().resolve() if cache_dir else None
    if cache is not None and cache.exists() and not cache.is_dir():
        raise ValueError(f"--bench-opt cache_dir={cache_dir}: {cache} is a file; give a folder "
                         f"(it is created if missing)")
    listings = list_trees(root)
    problems = check_layout(root, listings)
    if problems:
        layout = "\n".join(f"  {root}/{n}/{{train,test}}/<class>/<images>" for n, _, _ in DATASETS)
        raise DataUnavailableError(
            "CUB-to-Sketches data is incomplete:\n  - " + "\n  - ".join(problems)
            + f"\nExpected layout (the Piggyback release):\n{layout}\n"
            "Set the folder with --data-root or $NWS_DATA_ROOT."
        )
    what = {(name, split): f"task {t + 1} ({name}), {split}"
            for t, (name, _, _) in enumerate(DATASETS) for split in ("train", "test")}
    checked = [(what[key], *unreadable_images([p for p, _ in tree.samples], verify))
               for key, tree in listings.items()]
    if any(bad for _, _, bad in checked):  # every damaged file of every tree, in one message
        raise DataUnavailableError(unreadable_message(checked))
    tasks = []
    for t, (name, expected, cropped) in enumerate(DATASETS):
        train_tf, test_tf = transforms(cropped)
        train = ImageTree(listings[name, "train"], what[name, "train"], train_tf)
        test = ImageTree(listings[name, "test"], what[name, "test"], test_tf)
        step, size = first_step(cropped)
        train_aug, test_aug = batch_transforms(cropped)
        train = DecodedImages(train, step, size, train_aug, cache, f"{name}-train", root)
        test = DecodedImages(test, step, size, test_aug, cache, f"{name}-test", root)
        if len(train.classes) != expected:
            log.warning("%s has %d classes, the release has %d: not comparable with the paper",
                        name, len(train.classes), expected)
        tasks.append(Task(t, name, list(train.classes), train, test))
    return Benchmark(
        "cub_to_sketches", tasks, default_pretrained="imagenet", input_size=224,
        notes="Piggyback release ImageFolder trees (docs/reference.md §3)",
    )
