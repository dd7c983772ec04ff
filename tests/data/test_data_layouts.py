"""Data layouts (issue 21, item 9): a layout found but incomplete is refused naming what is
missing, never replaced by another source (the other layout, or a download). Small files in
the real on-disk formats (:mod:`tests.fakes`)."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.data import BENCHMARKS, DataUnavailableError
from benchmarks.data.split_cifar100 import SUPERCLASSES
from benchmarks.exec import run as cli
from tests.fakes import write_cifar100_python, write_image_folder

FIRST = next(iter(SUPERCLASSES))


@pytest.fixture
def no_download(monkeypatch):
    """torchvision's CIFAR-100 download fails the test if it is ever called."""
    import torchvision

    def download(*args, **kwargs):
        raise AssertionError("downloaded CIFAR-100 in place of the user's folder")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", download)


def _authors_layout(root, skip=()) -> None:
    """The authors' ``{train,test}/<superclass>/<fine>/*.png``, without the superclasses in
    ``skip``."""
    for split in ("train", "test"):
        for superclass, fines in SUPERCLASSES.items():
            if superclass not in skip:
                for fine in fines:
                    write_image_folder(root / split / superclass, [fine], n=1, size=8)


def _build(root, **options):
    return BENCHMARKS.get("split_cifar100")(root, **options)


def test_the_authors_layout_without_its_first_superclass_is_refused_not_downloaded(
        tmp_path, no_download):
    _authors_layout(tmp_path, skip={FIRST})
    with pytest.raises(DataUnavailableError, match="incomplete") as err:
        _build(tmp_path, download=True)
    msg = str(err.value)
    for split in ("train", "test"):
        assert f"missing folder {tmp_path / split / FIRST} (task 1)" in msg
    assert "no other source" in msg and "not found" not in msg


def test_every_gap_of_the_authors_layout_is_named_at_once(tmp_path, no_download):
    _authors_layout(tmp_path)
    shutil.rmtree(tmp_path / "train")  # only test/ copied
    gone = tmp_path / "test" / "fish" / "ray"
    shutil.rmtree(gone)
    empty = tmp_path / "test" / "trees" / "oak_tree"
    for f in empty.iterdir():
        f.unlink()
    with pytest.raises(DataUnavailableError) as err:
        _build(tmp_path, download=True)
    msg = str(err.value)
    assert f"missing folder {tmp_path / 'train'}" in msg
    assert f"missing folder {gone} (task 2)" in msg and f"no images in {empty} (task 18)" in msg


@pytest.mark.parametrize("verify", ["header", "none"])
def test_a_python_release_missing_a_file_is_refused_not_downloaded_over(tmp_path, no_download,
                                                                       verify):
    write_cifar100_python(tmp_path)
    (tmp_path / "cifar-100-python" / "test").unlink()
    _authors_layout(tmp_path)  # a complete other layout is not used in its place either
    with pytest.raises(DataUnavailableError, match="incomplete") as err:
        _build(tmp_path, download=True, verify=verify)
    assert f"{tmp_path / 'cifar-100-python' / 'test'} missing" in str(err.value)


def test_the_cli_exits_2_naming_the_gap(tmp_path, no_download, capsys):
    _authors_layout(tmp_path, skip={FIRST})
    assert cli.main(["--method", "finetune", "--benchmark", "split_cifar100", "--protocol",
                     "smoke", "--data-root", str(tmp_path), "--out",
                     str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "train" / FIRST) in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
