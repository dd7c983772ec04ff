"""analysis.report: one self-contained HTML page of a sweep, built from run folders and
rendered by a real browser (headless Chromium, where installed) without a console error."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from analysis import report
from benchmarks.core.epoch_log import EpochCSV, EpochRecord
from tests.analysis.test_tables_partial import _write_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = ("status", "tables", "figures", "curves", "provenance")


def _results(tmp_path: Path) -> Path:
    """Two CUB-to-Sketches runs (Finetune 1 of 5 tasks, NWS 5 of 5), each with an
    epochs.csv and an env.json."""
    runs = tmp_path / "runs"
    _write_run(runs, "finetune", [0.80], planned=1)
    _write_run(runs, "nws", [0.70, 0.80, 0.90, 0.60, 0.70], planned=5)
    for i, run_dir in enumerate(sorted(runs.iterdir())):
        log = EpochCSV(run_dir)
        for t in range(2):
            for e in range(3):
                log.append(EpochRecord(t, 0, "train", e, 3, 4, 2.0 / (1 + e + t), 0.1, 0.5,
                                       100.0, 0))
        (run_dir / "env.json").write_text(json.dumps(
            {"git_commit": f"abc{i}def0123456789", "git_dirty": i == 1, "torch": "2.9.0",
             "python": "3.11.7", "device": "cpu", "device_name": "x86_64"}))
    return runs


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> tuple[str, Path]:
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "report.html"
    assert report.main(["--results", str(_results(tmp)), "--benchmark", "cub_to_sketches",
                        "--out", str(out)]) == 0
    return out.read_text(), out


def test_the_page_has_every_section_the_paper_beside_ours_and_no_outside_reference(page):
    html, _ = page
    for key in SECTIONS:
        assert f'<h2 id="{key}">' in html
    assert "<p>2 done</p>" in html  # NWS 5/5 tasks, Finetune 1/1 (--tasks 1)
    assert "Table 1 layout" in html and "Table 2 layout" in html and "Table 3 layout" in html
    # Finetune's Table 1 row: 80.0 against the paper's figure, the difference beside it
    row = next(r for r in html.split("<tr>") if r.startswith("<td>finetune</td>"))
    paper = float(re.search(r"<td>([\d.]+) \(5 tasks\)</td>", row).group(1))
    assert f"{80.0 - paper:+.1f} (partial)" in row
    assert html.count('src="data:image/png;base64,') >= 3  # fig 3, matrices, curves
    assert "mean training loss per epoch" in html
    assert "abc0def01234" in html and "abc1def01234+dirty" in html  # the commits, per row
    assert "torch 2.9.0" in html and "cpu (x86_64)" in html
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert all(r.startswith(("data:", "#")) for r in refs), refs  # nothing to fetch


def test_bad_flags_exit_2(tmp_path, capsys):
    assert report.main(["--results", str(tmp_path / "none"), "--benchmark", "x"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert report.main(["--results", str(tmp_path)]) == 2
    assert report.main(["--results", str(tmp_path), "--benchmark", "x", "--out",
                        str(tmp_path)]) == 2


CHECK_IMAGES = ("<script>window.addEventListener('load', () => { for (const i of "
                "document.images) if (!i.naturalWidth) console.error('image not decoded: ' "
                "+ i.alt); });</script>")


def _render(path: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """Headless Chromium's DOM of ``path`` and the console lines it logged."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
         "--v=0", "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_chromium_renders_the_page_without_a_console_error(page, tmp_path):
    html, _ = page
    checked = tmp_path / "checked.html"
    checked.write_text(html.replace("</body>", CHECK_IMAGES + "</body>"))
    dom, console = _render(checked, tmp_path)
    assert console == [] and '<h2 id="provenance">' in dom
    broken = tmp_path / "broken.html"  # the check sees an image that does not decode
    broken.write_text(html.replace('base64,iVBOR', 'base64,AAAA', 1)
                      .replace("</body>", CHECK_IMAGES + "</body>"))
    assert any("image not decoded" in line for line in _render(broken, tmp_path)[1])
