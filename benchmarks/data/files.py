"""One rule for the files of a data tree, and the checks that find unreadable data early.

**Listing rule** (every loader of a folder tree uses :func:`list_tree` or :func:`image_files`):

- a *hidden* entry (its name starts with ``.``: ``.ipynb_checkpoints/``, ``.DS_Store``,
  AppleDouble ``._foo.jpg``, ``.git/``) is never a class and never a sample, nor is anything
  below a hidden folder;
- a file whose extension is not an image extension (:data:`IMAGE_SUFFIXES`, case-insensitive:
  ``notes.txt``, ``Thumbs.db``, ``labels.csv``) is never a sample;
- a class is a visible sub-folder of the split folder; its samples are the image files
  anywhere below it (as torchvision's ImageFolder walks), in sorted path order.

What was skipped is logged once per tree (counts and one example path). A file *with* an
image extension is a sample: if it cannot be read, that is an error naming it, not a skip
(a damaged download must not silently shrink a class).

**Checks** (:func:`check_images`, before any training), chosen with ``verify``:

- ``"header"`` (default): PIL identifies the format and size from the header, and a JPEG or
  PNG must end with its end marker (JPEG ``FF D9`` after any trailing padding, PNG's
  ``IEND`` chunk): a truncated download fails here, at the cost of reading two small pieces
  of each file;
- ``"full"``: every image is decoded completely (``--bench-opt verify=full``; slow on the
  large trees, for a copy you doubt);
- ``"none"``: no check (a derived copy you made yourself; the run's config records it).

CIFAR-100's python release is checked against the MD5s torchvision publishes
(:func:`check_cifar100_python`). A file that fails later anyway (decoded during training or
evaluation) raises :class:`~benchmarks.data.base.DataUnavailableError` naming the file and
its task (:class:`NamedImageLoader`), which the CLI turns into exit 2 like missing data.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from torchvision import datasets

from benchmarks.data.base import DataUnavailableError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif",
                            ".tiff", ".webp", ".gif"})
VERIFY_LEVELS = ("none", "header", "full")
# Benchmark options that only decide how data is checked or where its decoded cache lives,
# never what it is: a run's identity (what must match to resume it) leaves them out.
CHECK_ONLY_OPTIONS = ("verify", "cache_dir")
_JPEG_PADDING = b"\x00\r\n \xff"  # bytes some writers append after the JPEG end marker
_TAIL_BYTES = 4096
_CHECK_THREADS = 8  # header checks are I/O bound


def is_hidden(name: str) -> bool:
    """Hidden by the listing rule: the name starts with '.' (covers ``._*`` AppleDouble)."""
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


@dataclass
class Skipped:
    """What the listing rule left out of one tree: counts by kind and one example each."""

    counts: Counter = field(default_factory=Counter)  # "hidden" | "not an image" -> count
    examples: dict[str, Path] = field(default_factory=dict)

    def add(self, kind: str, path: Path) -> None:
        self.counts[kind] += 1
        self.examples.setdefault(kind, path)

    def merge(self, other: Skipped) -> None:
        for kind, n in other.counts.items():
            self.counts[kind] += n
            self.examples.setdefault(kind, other.examples[kind])

    def log_note(self, tree: Path) -> None:
        """One log line for ``tree`` when anything was skipped."""
        if not self.counts:
            return
        parts = [f"{n} {kind} (e.g. {self.examples[kind]})" for kind, n in self.counts.items()]
        log.info("%s: skipped %s; hidden entries and non-image files are never classes or "
                 "samples", tree, ", ".join(parts))


def _visible_children(folder: Path, skipped: Skipped) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    out = []
    for e in entries:
        if is_hidden(e.name):
            skipped.add("hidden", Path(e.path))
        else:
            out.append(e)
    return out


def image_files(folder: Path, skipped: Skipped | None = None,
                recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` by the listing rule, sorted by path.

    Symlinked folders are followed (as ImageFolder does). ``skipped`` collects what was left
    out; pass one to log it with :meth:`Skipped.log_note`.
    """
    skipped = skipped if skipped is not None else Skipped()
    out = []
    for e in _visible_children(folder, skipped):
        if e.is_dir():
            if recursive:
                out += image_files(Path(e.path), skipped, recursive)
            else:
                skipped.add("not an image", Path(e.path))
        elif is_image_name(e.name):
            out.append(Path(e.path))
        else:
            skipped.add("not an image", Path(e.path))
    return sorted(out)


@dataclass
class TreeListing:
    """An ImageFolder-style split folder (``<root>/<class>/**/<image>``) by the listing rule."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]  # (path, class index), ImageFolder's form
    skipped: Skipped

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def empty_classes(self) -> list[str]:
        have = {i for _, i in self.samples}
        return [c for i, c in enumerate(self.classes) if i not in have]


def list_tree(root: Path, log_skipped: bool = True) -> TreeListing:
    """Classes (visible sub-folders, sorted) and samples of one split folder.

    Files directly in ``root`` are not samples (they belong to no class); they are counted
    as skipped. Raises ``DataUnavailableError`` if ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataUnavailableError(f"missing folder {root}")
    skipped = Skipped()
    classes, samples = [], []
    for e in _visible_children(root, skipped):
        if not e.is_dir():
            skipped.add("not a class folder" if is_image_name(e.name) else "not an image",
                        Path(e.path))
            continue
        label = len(classes)
        classes.append(e.name)
        samples += [(str(p), label) for p in image_files(Path(e.path), skipped)]
    if log_skipped:
        skipped.log_note(root)
    return TreeListing(root, classes, samples, skipped)


# -- checks ------------------------------------------------------------------------------


def _ends_complete(path: Path, fmt: str) -> bool:
    """JPEG: the end marker FF D9 (after any padding); PNG: the IEND chunk. Else True."""
    if fmt not in ("JPEG", "PNG"):
        return True
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(0, size - _TAIL_BYTES))
        tail = fh.read()
    if fmt == "JPEG":
        return tail.rstrip(_JPEG_PADDING).endswith(b"\xff\xd9")
    return b"IEND" in tail[-64:]


def check_image(path: Path, level: str = "header") -> str | None:
    """Why ``path`` cannot be used as an image at ``level`` (see the module doc), or None."""
    from PIL import Image, UnidentifiedImageError

    if level == "none":
        return None
    try:
        with Image.open(path) as img:
            fmt, size = img.format, img.size
            if level == "full":
                img.load()
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except (OSError, SyntaxError, ValueError) as err:  # PIL's ways of saying "damaged"
        return f"cannot be decoded ({err})"
    if size[0] < 1 or size[1] < 1:
        return f"has size {size}"
    if not _ends_complete(path, fmt):
        return f"{fmt} file is truncated (no end marker)"
    return None


def unreadable_images(paths: Iterable[Path | str], level: str = "header"
                      ) -> tuple[int, list[tuple[Path, str]]]:
    """(files checked, [(path, why)] for each that fails at ``level``)."""
    if level not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {level!r}")
    paths = [Path(p) for p in paths]
    if level == "none":
        return len(paths), []
    start = time.perf_counter()
    with ThreadPoolExecutor(_CHECK_THREADS) as pool:
        reasons = list(pool.map(lambda p: check_image(p, level), paths))
    log.debug("%d images checked (%s) in %.1f s", len(paths), level,
              time.perf_counter() - start)
    return len(paths), [(p, r) for p, r in zip(paths, reasons, strict=True) if r is not None]


def unreadable_message(groups: list[tuple[str, int, list[tuple[Path, str]]]]) -> str:
    """One message for (what, files checked, failures) groups, with what to do, once."""
    parts = []
    for what, total, bad in groups:
        if bad:
            shown = "\n".join(f"  - {p}: {r}" for p, r in bad[:10])
            more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
            parts.append(f"{what}: {len(bad)} of {total} image files cannot be read:\n"
                         f"{shown}{more}")
    return ("\n".join(parts) + "\nReplace these files from the original release (or delete "
            "them if the data set should not have them), then run again.")


def check_images(paths: Iterable[Path | str], what: str, level: str = "header") -> None:
    """Check every image before training; one error listing the failures (at most 10 shown).

    ``what`` names the data (task and split) in the message. Raises ``DataUnavailableError``.
    """
    total, bad = unreadable_images(paths, level)
    if bad:
        raise DataUnavailableError(unreadable_message([(what, total, bad)]))


class UnreadableFileError(DataUnavailableError):
    """A data file failed to decode; the message names it and its task.

    Raised inside a data-loader worker, torch re-raises it in the main process with the
    worker's traceback folded into the message; that text is cut back to the message itself,
    so the CLI shows one clear error, not a traceback.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class NamedImageLoader:
    """ImageFolder's ``loader``: decodes to RGB, and names the file and its task on failure.

    Picklable (data-loader workers). Raises :class:`UnreadableFileError` (CLI exit 2).
    """

    def __init__(self, what: str) -> None:
        self.what = what

    def __call__(self, path: str):
        from PIL import Image

        try:
            with open(path, "rb") as fh:
                img = Image.open(fh)
                return img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:
            raise UnreadableFileError(
                f"{path} ({self.what}) cannot be decoded: {err}. Replace it from the original "
                f"release (check the whole tree with --bench-opt verify=full), then run again;"
                f" finished tasks and epochs are kept."
            ) from err


class ImageTree(datasets.ImageFolder):
    """torchvision's ImageFolder over a :class:`TreeListing` (the listing rule), decoding
    with :class:`NamedImageLoader`, so a damaged file is named with ``what`` (its task)."""

    def __init__(self, listing: TreeListing, what: str, transform=None) -> None:
        self._listing = listing
        super().__init__(str(listing.root), transform, loader=NamedImageLoader(what))

    def find_classes(self, directory):
        return list(self._listing.classes), self._listing.class_to_idx

    def make_dataset(self, directory, class_to_idx, *args, **kwargs):
        return list(self._listing.samples)


def image_folder(root: Path, transform=None, what: str | None = None,
                 verify: str = "header") -> ImageTree:
    """The ImageFolder of ``root`` by the listing rule, every image checked at ``verify``
    first: what any tool reading a class-folder tree should use (e.g. pool pretraining)."""
    listing = list_tree(root)
    what = what or str(root)
    if not listing.samples:
        raise DataUnavailableError(f"{root} holds no images in class folders "
                                   f"(expected {root}/<class>/<image>)")
    check_images([p for p, _ in listing.samples], what, verify)
    return ImageTree(listing, what, transform)


# -- CIFAR-100's python release ------------------------------------------------------------


def cifar100_md5s() -> dict[str, str]:
    """File name -> MD5 of CIFAR-100's python release, as torchvision publishes them."""
    from torchvision.datasets import CIFAR100

    files = {name: md5 for name, md5 in [*CIFAR100.train_list, *CIFAR100.test_list]}
    files[CIFAR100.meta["filename"]] = CIFAR100.meta["md5"]
    return files


def check_cifar100_python(folder: Path) -> None:
    """Every file of ``cifar-100-python/`` against its published MD5 (torchvision's
    ``check_integrity``). Raises ``DataUnavailableError`` naming each failing file."""
    from torchvision.datasets.utils import check_integrity

    bad = []
    for name, md5 in cifar100_md5s().items():
        path = Path(folder) / name
        if not path.is_file():
            bad.append(f"{path}: missing")
        elif not check_integrity(str(path), md5):
            bad.append(f"{path}: MD5 differs from the release's {md5} "
                       f"({path.stat().st_size} bytes): damaged or incomplete")
    if bad:
        raise DataUnavailableError(
            "CIFAR-100's python release fails its checksums:\n  - " + "\n  - ".join(bad)
            + f"\nDelete {folder} (and cifar-100-python.tar.gz beside it) and download again "
            "(the suite downloads it when online), or extract a fresh cifar-100-python.tar.gz "
            "there. For a copy you derived yourself on purpose: --bench-opt verify=none."
        )
