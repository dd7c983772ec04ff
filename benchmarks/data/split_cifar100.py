"""Split-CIFAR-100: 20 five-class tasks, task t = CIFAR-100 superclass t (docs/reference.md §3).

Two on-disk sources under the data root, looked for in this order; the first found (any
of its files present) is used, and must be complete: one found but incomplete is refused
naming everything missing, never replaced by the next source or a download:

1. CIFAR-100's own python release, ``<root>/cifar-100-python/{train,test,meta}`` (what
   torchvision downloads; downloaded when absent and ``download=True``). Its coarse labels
   are checked against :data:`SUPERCLASSES`: a mismatch stops the run, because a wrong
   superclass map makes results incomparable.
2. The authors' ImageFolder layout, ``<root>/{train,test}/<superclass>/<fine class>/*.png``,
   listed by the rule of :mod:`benchmarks.data.files` (hidden entries and non-image files
   are skipped with a log note) and checked before decoding. Found when ``train/`` or
   ``test/`` holds any folder.

Labels 0..4 within a task follow the sorted fine-class names. Training: RandomCrop(32, pad 4)
+ horizontal flip; train and test: the per-superclass normalisation of docs/reference.md §7.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from benchmarks.data.base import Benchmark, DataUnavailableError, Task, TensorImages
from benchmarks.data.batches import BatchAugment
from benchmarks.data.files import (
    VERIFY_LEVELS,
    NamedImageLoader,
    Skipped,
    check_cifar100_python,
    image_files,
    unreadable_images,
    unreadable_message,
)

# Superclass -> its five fine classes, in the task order of docs/reference.md §3 (alphabetical).
SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}

# docs/reference.md §7: per-superclass mean and std (R, G, B), in task order.
NORMALISATION: list[tuple[tuple[float, float, float], tuple[float, float, float]]] = [
    ((.4242, .4783, .4975), (.2495, .2327, .2515)),
    ((.4162, .4626, .4577), (.2857, .2574, .2705)),
    ((.5233, .4080, .3058), (.2892, .2489, .2613)),
    ((.5824, .5459, .5111), (.2761, .2782, .2888)),
    ((.6010, .4927, .3616), (.2902, .2837, .2952)),
    ((.5573, .5368, .5251), (.2933, .2937, .3028)),
    ((.6104, .5407, .4902), (.2603, .2774, .2956)),
    ((.5568, .5380, .4312), (.2736, .2630, .2923)),
    ((.4719, .4395, .3713), (.2352, .2244, .2276)),
    ((.4848, .5094, .5116), (.2408, .2411, .2736)),
    ((.4684, .4971, .5026), (.2349, .2283, .2731)),
    ((.4832, .4650, .3997), (.2428, .2375, .2373)),
    ((.4511, .4291, .3669), (.2355, .2248, .2261)),
    ((.5093, .4760, .4164), (.2645, .2566, .2684)),
    ((.5193, .4570, .4242), (.2801, .2735, .2794)),
    ((.4877, .4781, .4336), (.2619, .2418, .2526)),
    ((.5117, .4798, .4125), (.2389, .2288, .2377)),
    ((.4544, .4833, .4314), (.2356, .2345, .2817)),
    ((.4979, .4858, .4642), (.2633, .2609, .2733)),
    ((.5301, .5280, .5037), (.2730, .2693, .2874)),
]

PYTHON_DIR = "cifar-100-python"
PYTHON_FILES = ("meta", "train", "test")


def _subfolders(folder: Path) -> list[Path]:
    """Visible subfolders of ``folder`` ([] when it is not a folder)."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, MemoryError) as err:
        raise DataUnavailableError(
            f"{path} cannot be read as CIFAR-100's python release ({type(err).__name__}: "
            f"{err}): the file is damaged or incomplete. Delete {path.parent} and download "
            f"again (the suite downloads it when online)."
        ) from err


def _check_coarse_labels(split: dict, fine_names: list[str], coarse_names: list[str]) -> None:
    fine = np.asarray(split["fine_labels"])
    coarse = np.asarray(split["coarse_labels"])
    expected = {f: s for s, fs in SUPERCLASSES.items() for f in fs}
    wrong = sorted(
        {
            (fine_names[f], coarse_names[c])
            for f, c in zip(fine.tolist(), coarse.tolist(), strict=True)
            if expected.get(fine_names[f]) != coarse_names[c]
        }
    )
    if wrong:
        raise DataUnavailableError(
            "CIFAR-100 coarse labels disagree with the superclass map of docs/reference.md §3 for "
            f"(fine, coarse) pairs {wrong[:5]}: the files are not CIFAR-100 as released"
        )


def _load_python_release(folder: Path, verify: str = "header"
                         ) -> dict[str, tuple[np.ndarray, list[str]]]:
    """{'train'|'test': (uint8 images N x 3 x 32 x 32, fine class names)} from the pickles,
    checked against the release's MD5s first unless ``verify == "none"``."""
    if verify != "none":
        check_cifar100_python(folder)
    meta = _unpickle(folder / "meta")
    fine_names, coarse_names = meta["fine_label_names"], meta["coarse_label_names"]
    out = {}
    for split in ("train", "test"):
        raw = _unpickle(folder / split)
        _check_coarse_labels(raw, fine_names, coarse_names)
        images = np.asarray(raw["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        out[split] = (images, [fine_names[f] for f in raw["fine_labels"]])
    return out


def _load_image_folders(root: Path, verify: str = "header"
                        ) -> dict[str, tuple[np.ndarray, list[str]]]:
    """The authors' layout, listed by the rule of :mod:`benchmarks.data.files` (hidden entries
    such as ``.DS_Store`` and non-image files are skipped, with one log line per split) and
    checked before decoding (every damaged file of every task in one message); a file that
    still cannot be decoded is named with its task."""
    superclasses = list(SUPERCLASSES)
    listed: dict[tuple[str, int], list[tuple[str, list[Path]]]] = {}  # (split, task) -> files
    problems = []  # every one, in one message
    for split in ("train", "test"):
        skipped = Skipped()
        if not (root / split).is_dir():
            problems.append(f"missing folder {root / split} (every task's {split} images)")
            continue
        for t, (superclass, fines) in enumerate(SUPERCLASSES.items()):
            listed[split, t] = []
            if not (root / split / superclass).is_dir():
                problems.append(f"missing folder {root / split / superclass} (task {t + 1})")
                continue
            for fine in fines:
                folder = root / split / superclass / fine
                files = image_files(folder, skipped) if folder.is_dir() else []
                if not files:
                    problems.append(f"{'missing folder' if not folder.is_dir() else 'no images in'}"
                                    f" {folder} (task {t + 1})")
                listed[split, t].append((fine, files))
        skipped.log_note(root / split)
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataUnavailableError(
            f"the Split-CIFAR-100 image-folder layout under {root} is incomplete:\n  - "
            + "\n  - ".join(problems[:20]) + more
            + f"\nComplete it ({root}/{{train,test}}/<superclass>/<fine class>/*.png: 20 "
            f"superclasses x 5 fine classes), or move {root}/train and {root}/test away to "
            f"use CIFAR-100's python release instead; no other source is used in its place.")
    what = {(split, t): f"task {t + 1} ({superclasses[t]}), {split}" for split, t in listed}
    checked = [(what[key], *unreadable_images([f for _, fs in v for f in fs], verify))
               for key, v in listed.items()]
    if any(bad for _, _, bad in checked):
        raise DataUnavailableError(unreadable_message(checked))
    out = {}
    for split in ("train", "test"):
        images, names = [], []
        for t in range(len(superclasses)):
            decode = NamedImageLoader(what[split, t])
            for fine, files in listed[split, t]:
                for f in files:
                    img = np.asarray(decode(str(f)).resize((32, 32)))
                    images.append(img.transpose(2, 0, 1))
                    names.append(fine)
        out[split] = (np.stack(images), names)
    return out


def _locate(root: Path, download: bool, verify: str = "header"
            ) -> dict[str, tuple[np.ndarray, list[str]]]:
    """The first source found under ``root`` (a folder holding any of its files), checked
    whole: a source found but incomplete is refused naming what is missing, never replaced by
    the next source or a download (which would train on other data than the user's)."""
    python = root / PYTHON_DIR
    present = [n for n in PYTHON_FILES if (python / n).is_file()]
    if present:
        missing = [str(python / n) for n in PYTHON_FILES if n not in present]
        if missing:
            raise DataUnavailableError(
                f"CIFAR-100's python release at {python} is incomplete: {', '.join(missing)} "
                f"missing. Extract cifar-100-python.tar.gz there again (or delete {python} "
                f"and let the suite download it, online); no other source is used in its "
                f"place.")
        return _load_python_release(python, verify)
    if any(_subfolders(root / split) for split in ("train", "test")):
        return _load_image_folders(root, verify)
    if download:
        import torchvision

        try:
            torchvision.datasets.CIFAR100(str(root), train=True, download=True)
        except Exception as err:
            raise DataUnavailableError(_missing_message(root, f"download failed: {err}")) from err
        return _load_python_release(root / PYTHON_DIR, verify)
    raise DataUnavailableError(_missing_message(root, "not found"))


def _missing_message(root: Path, why: str) -> str:
    return (
        f"CIFAR-100 {why} under {root}.\nExpected either {root}/{PYTHON_DIR}/{{train,test,meta}}"
        f" (the python release: put cifar-100-python.tar.gz's contents there, or let the suite "
        f"download it with internet) or the ImageFolder layout "
        f"{root}/{{train,test}}/<superclass>/<fine class>/*.png. "
        f"Set the folder with --data-root or $NWS_DATA_ROOT."
    )


def build(data_root: Path, download: bool = True, verify: str = "header") -> Benchmark:
    """The 20 tasks. ``verify`` (``none | header | full``, :mod:`benchmarks.data.files`):
    the python release is checked against its MD5s unless ``none``; the image layout's files
    by header, or fully with ``full`` (they are all decoded here anyway)."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    root = Path(data_root).expanduser().resolve()
    splits = _locate(root, download, verify)
    tasks = []
    for t, (superclass, fines) in enumerate(SUPERCLASSES.items()):
        classes = sorted(fines)
        mean, std = NORMALISATION[t]
        norm = T.Normalize(mean, std)
        train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), norm])
        parts = {}
        for split, (images, names) in splits.items():
            label_of = {c: i for i, c in enumerate(classes)}
            idx = [i for i, n in enumerate(names) if n in label_of]
            labels = torch.tensor([label_of[names[i]] for i in idx])
            parts[split] = (torch.from_numpy(images[idx]), labels)
        tasks.append(
            Task(
                index=t, name=superclass, classes=classes,
                train=TensorImages(*parts["train"], train_tf,
                                   BatchAugment(mean, std, pad=4, flip=True)),
                test=TensorImages(*parts["test"], norm, BatchAugment(mean, std)),
            )
        )
    return Benchmark(
        "split_cifar100", tasks, default_pretrained="imagenet", input_size=32,
        notes="CIFAR-100 by superclass, per-superclass normalisation (docs/reference.md §3, §7)",
    )
