"""Data trees as users have them: hidden entries and OS metadata, damaged files, named early."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.data import BENCHMARKS, DataUnavailableError
from benchmarks.data import cub_to_sketches as cub
from benchmarks.data.files import check_image, list_tree
from benchmarks.data.split_cifar100 import SUPERCLASSES
from benchmarks.exec.run import main
from tests.fakes import write_cifar100_python, write_image_folder


def _jpeg(path, size=64, value=90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, "JPEG")


def _truncate(path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _cub_tree(root) -> None:
    for name, _, _ in cub.DATASETS:
        for split in ("train", "test"):
            for c in ("a", "b"):
                _jpeg(root / name / split / c / "0.jpg", value=ord(c))


def _os_clutter(folder) -> None:
    """What Jupyter, macOS and Windows leave in a data tree."""
    _jpeg(folder / ".ipynb_checkpoints" / "0-checkpoint.jpg")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (folder / "a" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble
    (folder / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (folder / "b" / "Thumbs.db").write_bytes(bytes(32))
    (folder / "README.txt").write_text("class folders below")


def test_hidden_entries_and_non_images_are_never_classes_or_samples(tmp_path, caplog):
    _cub_tree(tmp_path)
    for split in ("train", "test"):
        _os_clutter(tmp_path / "cubs_cropped" / split)
    with caplog.at_level(logging.INFO, logger="benchmarks.data.files"):
        bench = BENCHMARKS.get("cub_to_sketches")(tmp_path)
    task = bench.tasks[0]
    assert task.classes == ["a", "b"]
    for ds in (task.train, task.test):
        assert [(p.split("/")[-2], y) for p, y in ds.samples] == [("a", 0), ("b", 1)]
        _, y = ds[1]
        assert y == 1
    notes = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(notes) == 2  # one line per tree with clutter, none for the clean ones
    train_note = next(n for n in notes if "cubs_cropped/train" in n)
    # .ipynb_checkpoints, .DS_Store x2, ._0.jpg are hidden; Thumbs.db, README.txt not images
    assert "4 hidden" in train_note and "2 not an image" in train_note
    assert "train/.DS_Store" in train_note and "README.txt" in train_note


def test_list_tree_follows_image_folder_recursion_but_not_hidden_folders(tmp_path):
    _jpeg(tmp_path / "x" / "sub" / "1.JPG")
    _jpeg(tmp_path / "x" / ".cache" / "2.jpg")
    _jpeg(tmp_path / "y" / "3.png")
    tree = list_tree(tmp_path)
    assert tree.classes == ["x", "y"]
    assert [(p.replace(str(tmp_path), ""), y) for p, y in tree.samples] == [
        ("/x/sub/1.JPG", 0), ("/y/3.png", 1)]
    assert tree.skipped.counts["hidden"] == 1


def test_authors_cifar_layout_skips_ds_store_and_checkpoints(tmp_path, caplog):
    for split in ("train", "test"):
        for superclass, fines in SUPERCLASSES.items():
            for fine in fines:
                write_image_folder(tmp_path / split / superclass, [fine], n=1, size=32)
    (tmp_path / "train" / "aquatic_mammals" / "beaver" / ".DS_Store").write_bytes(bytes(64))
    write_image_folder(tmp_path / "train" / "aquatic_mammals" / "beaver" / ".ipynb_checkpoints",
                       ["x"], n=1, size=32)
    with caplog.at_level(logging.INFO, logger="benchmarks.data.files"):
        bench = BENCHMARKS.get("split_cifar100")(tmp_path, download=False)
    assert len(bench.tasks[0].train) == 5 and sorted(bench.tasks[0].train.labels.tolist()) == [
        0, 1, 2, 3, 4]
    notes = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(notes) == 1 and "2 hidden" in notes[0] and "beaver/.DS_Store" in notes[0]


def test_a_truncated_jpeg_is_named_before_training(tmp_path):
    _cub_tree(tmp_path)
    bad = tmp_path / "flowers" / "train" / "b" / "0.jpg"
    _truncate(bad)
    also = tmp_path / "sketches" / "test" / "a" / "0.jpg"
    also.write_bytes(b"GIF89a")
    assert check_image(tmp_path / "flowers" / "train" / "a" / "0.jpg") is None
    assert "truncated (no end marker)" in check_image(bad)
    with pytest.raises(DataUnavailableError) as err:
        BENCHMARKS.get("cub_to_sketches")(tmp_path)
    msg = str(err.value)
    assert str(bad) in msg and "task 3 (flowers), train" in msg and "1 of 2" in msg
    assert f"{also}: not an image" in msg  # every damaged file, not only the first
    assert "task 5 (sketches), test" in msg and msg.count("Replace these files") == 1


def test_a_file_that_fails_during_training_is_named_with_its_task(tmp_path):
    _cub_tree(tmp_path)
    bench = BENCHMARKS.get("cub_to_sketches")(tmp_path)  # checked and fine
    bad = tmp_path / "wikiart" / "test" / "a" / "0.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9")  # damaged afterwards
    with pytest.raises(DataUnavailableError) as err:
        bench.tasks[3].test[0]
    assert str(bad) in str(err.value) and "task 4 (wikiart), test" in str(err.value)


def test_full_verify_decodes_what_the_header_check_passes(tmp_path):
    _cub_tree(tmp_path)
    bad = tmp_path / "sketches" / "test" / "a" / "0.jpg"
    data = bytearray(bad.read_bytes())
    sos = data.index(b"\xff\xda")  # corrupt the entropy-coded data, keep both markers
    data[sos + 2: sos + 4] = b"\x00\x00"  # a scan header of length 0
    bad.write_bytes(bytes(data))
    assert check_image(bad, "header") is None
    assert check_image(bad, "full") is not None
    BENCHMARKS.get("cub_to_sketches")(tmp_path)  # default: header only
    with pytest.raises(DataUnavailableError, match="task 5 \\(sketches\\), test"):
        BENCHMARKS.get("cub_to_sketches")(tmp_path, verify="full")


def test_truncated_cifar_release_fails_its_checksum_with_what_to_do(tmp_path, capsys):
    write_cifar100_python(tmp_path)
    train = tmp_path / "cifar-100-python" / "train"
    _truncate(train, 0.5)
    code = main(["--method", "finetune", "--benchmark", "split_cifar100",
                 "--bench-opt", "download=false", "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "runs")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{train}: MD5 differs" in err and "Delete" in err and "download again" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_authors_cifar_layout_names_every_damaged_png_with_its_task(tmp_path):
    for split in ("train", "test"):
        for superclass, fines in SUPERCLASSES.items():
            for fine in fines:
                write_image_folder(tmp_path / split / superclass, [fine], n=1, size=32)
    bad = [tmp_path / "train" / "fish" / "ray" / "0.png",
           tmp_path / "test" / "vehicles_2" / "tank" / "0.png"]
    for path in bad:
        _truncate(path, 0.8)
    with pytest.raises(DataUnavailableError) as err:
        BENCHMARKS.get("split_cifar100")(tmp_path, download=False)
    msg = str(err.value)
    assert f"task 2 (fish), train: 1 of 5 image files cannot be read:\n  - {bad[0]}" in msg
    assert f"task 20 (vehicles_2), test: 1 of 5 image files cannot be read:\n  - {bad[1]}" in msg


def test_unreadable_cifar_pickle_is_named_even_without_checksums(tmp_path):
    write_cifar100_python(tmp_path)
    train = tmp_path / "cifar-100-python" / "train"
    raw = pickle.loads(train.read_bytes())
    assert {"data", "fine_labels", "coarse_labels"} <= set(raw)
    _truncate(train, 0.5)
    with pytest.raises(DataUnavailableError) as err:
        BENCHMARKS.get("split_cifar100")(tmp_path, download=False, verify="none")
    assert str(train) in str(err.value) and "download" in str(err.value)


def test_the_real_release_checksums_are_torchvisions():
    from torchvision.datasets import CIFAR100

    from benchmarks.data.files import cifar100_md5s

    assert cifar100_md5s() == {"train": CIFAR100.train_list[0][1],
                               "test": CIFAR100.test_list[0][1], "meta": CIFAR100.meta["md5"]}


def test_decode_errors_inside_a_loader_worker_keep_the_name(tmp_path):
    _cub_tree(tmp_path)
    bench = BENCHMARKS.get("cub_to_sketches")(tmp_path)
    bad = tmp_path / "cubs_cropped" / "train" / "b" / "0.jpg"
    bad.write_bytes(b"broken")
    dl = torch.utils.data.DataLoader(bench.tasks[0].train, batch_size=2, num_workers=1)
    with pytest.raises(DataUnavailableError) as err:
        next(iter(dl))
    assert str(err.value).startswith(f"{bad} (task 1 (cubs_cropped), train) cannot be decoded")
    assert "Traceback" not in str(err.value)


def test_image_folder_for_other_tools_applies_the_same_rule(tmp_path):
    from benchmarks.data.files import image_folder

    _jpeg(tmp_path / "a" / "0.jpg")
    _jpeg(tmp_path / "b" / "0.jpg")
    _os_clutter(tmp_path)
    ds = image_folder(tmp_path)
    assert ds.classes == ["a", "b"] and [y for _, y in ds.samples] == [0, 1]
    _truncate(tmp_path / "b" / "0.jpg")
    with pytest.raises(DataUnavailableError, match=r"b/0\.jpg"):
        image_folder(tmp_path)
