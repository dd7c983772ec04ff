"""The paper's numbers ship in the package (a wheel, not only the checkout), and a missing
table is said, not shown as a silent '-'."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from analysis import paper

REPO = Path(__file__).resolve().parent.parent.parent
TABLES = {f"analysis/paper_data/table{i}.csv" for i in (1, 2, 3)}


def test_the_wheel_holds_the_paper_tables(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("nws_bench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert names >= TABLES
    for name in TABLES:  # the same bytes as the checkout's
        assert zipfile.ZipFile(wheel).read(name) == (REPO / name).read_bytes()


def test_the_package_data_is_what_load_paper_reads():
    df = paper.load_paper()
    assert set(df.table) == {1, 2, 3}
    assert paper.paper_value(df, "split_cifar100", "finetune", "resnet18", "avg_accuracy") == 71.3
    assert str(paper.paper_dir()).endswith(str(Path("analysis", "paper_data")))


def test_a_folder_without_tables_warns(tmp_path):
    with pytest.warns(paper.PaperDataMissingWarning, match="not in"):
        df = paper.load_paper(tmp_path)
    assert df.empty and list(df.columns) == paper.COLUMNS
