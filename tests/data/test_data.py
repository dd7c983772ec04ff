"""Benchmarks: task splits against the data's own labels, layouts, messages, transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.core.registry import UnknownNameError
from benchmarks.data import BENCHMARKS, DataUnavailableError
from benchmarks.data import cub_to_sketches as cub
from benchmarks.data.split_cifar100 import NORMALISATION, SUPERCLASSES
from benchmarks.data.transforms import Cutout
from tests.fakes import write_cifar100_python, write_image_folder


def test_cifar_split_follows_the_datas_own_coarse_labels(tmp_path):
    write_cifar100_python(tmp_path)
    bench = BENCHMARKS.get("split_cifar100")(tmp_path, download=False, verify="none")
    assert [t.name for t in bench.tasks] == list(SUPERCLASSES)
    assert bench.tasks[0].name == "aquatic_mammals" and bench.tasks[19].name == "vehicles_2"
    import pickle

    folder = tmp_path / "cifar-100-python"
    meta = pickle.loads((folder / "meta").read_bytes())
    raw = pickle.loads((folder / "train").read_bytes(), encoding="latin1")
    for t, task in enumerate(bench.tasks):
        # every image of task t has coarse label t in the file, and labels follow sorted names
        coarse_name = meta["coarse_label_names"][t]
        assert task.name == coarse_name
        assert task.classes == sorted(SUPERCLASSES[coarse_name])
        assert len(task.train) == 5 * 3 and len(task.test) == 5 * 2
        for img, label in zip(task.train.images, task.train.labels, strict=True):
            fine = int(img[0, 0, 0])  # the fake writes the fine label into pixel 0
            assert raw["coarse_labels"][raw["fine_labels"].index(fine)] == t
            assert meta["fine_label_names"][fine] == task.classes[int(label)]


def test_cifar_normalisation_is_per_superclass(tmp_path):
    write_cifar100_python(tmp_path)
    bench = BENCHMARKS.get("split_cifar100")(tmp_path, download=False, verify="none")
    norm = bench.tasks[2].test.transform
    assert tuple(norm.mean) == NORMALISATION[2][0] and tuple(norm.std) == NORMALISATION[2][1]
    x, _ = bench.tasks[2].test[0]
    raw = bench.tasks[2].test.images[0].float() / 255
    expected = (raw[1] - NORMALISATION[2][0][1]) / NORMALISATION[2][1][1]
    assert torch.allclose(x[1], expected)


def test_a_wrong_superclass_map_stops_the_run(tmp_path):
    write_cifar100_python(tmp_path, swap=("beaver", "apple"))
    with pytest.raises(DataUnavailableError, match="beaver"):
        BENCHMARKS.get("split_cifar100")(tmp_path, download=False, verify="none")


def test_cifar_missing_says_where_and_what(tmp_path):
    with pytest.raises(DataUnavailableError, match="cifar-100-python") as err:
        BENCHMARKS.get("split_cifar100")(tmp_path / "nothing", download=False)
    assert "--data-root" in str(err.value)


def test_cifar_authors_image_folder_layout(tmp_path):
    for split in ("train", "test"):
        for superclass, fines in SUPERCLASSES.items():
            for fine in fines:
                write_image_folder(tmp_path / split / superclass, [fine], n=1, size=32)
    bench = BENCHMARKS.get("split_cifar100")(tmp_path, download=False)
    assert len(bench.tasks) == 20 and all(len(t.train) == 5 for t in bench.tasks)
    assert sorted(bench.tasks[7].train.labels.tolist()) == [0, 1, 2, 3, 4]


def _cub_tree(root, skip: str | None = None):
    for name, _, _ in cub.DATASETS:
        if name == skip:
            continue
        for split in ("train", "test"):
            write_image_folder(root / name / split, ["a", "b"], n=1, size=16)


def test_cub_to_sketches_loads_five_tasks_with_the_reference_transforms(tmp_path):
    _cub_tree(tmp_path)
    bench = BENCHMARKS.get("cub_to_sketches")(tmp_path)
    assert [t.name for t in bench.tasks] == [d for d, _, _ in cub.DATASETS]
    x, y = bench.tasks[0].train[0]
    assert x.shape == (3, 224, 224) and y in (0, 1)
    x, _ = bench.tasks[3].test[0]
    assert x.shape == (3, 224, 224)
    names = [type(t).__name__ for t in bench.tasks[2].train.transform.transforms]
    assert names == ["Resize", "RandomResizedCrop", "RandomHorizontalFlip", "ToTensor",
                     "Normalize", "Cutout"]
    names = [type(t).__name__ for t in bench.tasks[1].test.transform.transforms]
    assert names == ["Resize", "ToTensor", "Normalize"]


def test_cub_to_sketches_names_every_missing_piece(tmp_path):
    _cub_tree(tmp_path, skip="wikiart")
    (tmp_path / "flowers" / "test" / "b" / "0.png").unlink()
    with pytest.raises(DataUnavailableError) as err:
        BENCHMARKS.get("cub_to_sketches")(tmp_path)
    msg = str(err.value)
    assert "wikiart/train" in msg and "wikiart/test" in msg
    assert "flowers/test: class folders without images: ['b']" in msg
    assert "sketches/{train,test}/<class>" in msg  # the expected layout is shown


def test_cutout_zeroes_one_square_of_at_most_size_squared_pixels():
    torch.manual_seed(3)
    img = torch.ones(3, 32, 32)
    out = Cutout(16)(img)
    zeroed = (out == 0).all(0)
    assert 0 < int(zeroed.sum()) <= 16 * 16
    rows, cols = zeroed.any(1).nonzero(), zeroed.any(0).nonzero()
    assert int(zeroed.sum()) == len(rows) * len(cols)  # a rectangle
    assert img.min() == 1  # input untouched


def test_split_digits_is_real_fixed_and_balanced():
    bench = BENCHMARKS.get("split_digits")(None)
    again = BENCHMARKS.get("split_digits")(None)
    assert [t.name for t in bench.tasks] == ["digits_01", "digits_23", "digits_45",
                                             "digits_67", "digits_89"]
    for t, u in zip(bench.tasks, again.tasks, strict=True):
        assert torch.equal(t.train.images, u.train.images)
        assert t.train.images.shape[1:] == (3, 24, 24)  # the default size (issue 17)
        assert set(t.train.labels.tolist()) == {0, 1}
        assert 0.3 < len(t.test) / (len(t.train) + len(t.test)) < 0.36
    assert not bench.synthetic and bench.default_pretrained == "none"
    # no test image appears in training (the split is disjoint)
    tr = {bytes(x.numpy()) for x in bench.tasks[0].train.images}
    assert not any(bytes(x.numpy()) in tr for x in bench.tasks[0].test.images)


def test_split_digits_size_option_keeps_the_split_and_rejects_odd_sizes():
    small, full = (BENCHMARKS.get("split_digits")(None, size=s) for s in (16, 32))
    assert small.input_size == 16
    for t, u in zip(small.tasks, full.tasks, strict=True):
        assert t.train.images.shape[1:] == (3, 16, 16)
        assert torch.equal(t.train.labels, u.train.labels)  # same images, same split
        assert t.train[0][0].shape == (3, 16, 16)  # the crop keeps the size
    with pytest.raises(ValueError, match="multiple of 8"):
        BENCHMARKS.get("split_digits")(None, size=20)


def test_synthetic_is_marked_and_unknown_benchmarks_list_valid_names():
    assert BENCHMARKS.get("synthetic")(None).synthetic
    with pytest.raises(UnknownNameError, match="split_digits, split_cifar100"):
        BENCHMARKS.get("split_mnist")


def test_tensor_images_rejects_float_images():
    from benchmarks.data.base import TensorImages

    with pytest.raises(ValueError, match="uint8"):
        TensorImages(torch.zeros(2, 3, 4, 4), torch.zeros(2))
    assert np.isclose(TensorImages(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8),
                                   torch.zeros(1))[0][0].max(), 1.0)
