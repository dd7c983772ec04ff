"""CI: the suite as a user installs it (a wheel, not the checkout) finds the paper's numbers.

    python .ci/wheel_check.py        # with the Python of an env that has the dependencies

Builds the wheel (``pip wheel --no-deps --no-build-isolation``: this env's setuptools),
installs it with ``--no-deps`` into a fresh venv whose only other path is this env's
site-packages (a ``.pth`` line: the dependencies are reused, not downloaded; ``.pth`` files
in that folder, such as the editable install of the checkout, are not run), then, from a
folder outside the checkout, checks that ``analysis`` is imported from the wheel and runs
``python -m analysis.tables`` on a one-run results folder: the paper column must show the
paper's number. Exit 1 with the reason on any failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAPER_AVG = "81.4"  # Finetune on CUB-to-Sketches (analysis/paper_data/table2.csv)


def _run(cmd: list[str], **kw) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode:
        sys.exit(f"wheel check: {' '.join(map(str, cmd))} failed ({done.returncode}):\n"
                 f"{done.stdout}\n{done.stderr}")
    return done.stdout


def tiny_results(root: Path) -> None:
    """One Finetune run of CUB-to-Sketches that learned 2 of its 5 tasks (rows, config)."""
    rid = "cub_to_sketches-finetune-resnet18-paper-s1993-wheel"
    base = ("cub_to_sketches", "finetune", "resnet18", "paper", 1993, False)
    lines = ["run_id,benchmark,method,arch,protocol,seed,synthetic,task,task_name,after_task,"
             "metric,value"]
    for after in range(2):
        for task in range(after + 1):
            lines.append(",".join(map(str, (rid, *base, task, f"t{task}", after, "accuracy",
                                            0.5))))
    (root / rid).mkdir(parents=True)
    (root / rid / "rows.csv").write_text("\n".join(lines) + "\n")
    (root / rid / "config.json").write_text(json.dumps(
        {"identity": {"options": {}}, "tasks": [{"index": t} for t in range(2)]}))


def main() -> int:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nws-wheel-") as tmp:
        tmp = Path(tmp)
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
              "-w", str(tmp / "dist"), str(REPO)])
        wheel = next((tmp / "dist").glob("nws_bench-*.whl"))
        built = time.perf_counter()
        venv = tmp / "venv"
        _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
        python = venv / "bin" / "python"
        purelib = Path(_run([str(python), "-c",
                             "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
        _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
              "-q", str(wheel)])
        # after the install: pip would take this env's (editable) nws-bench as installed
        (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        where = _run([str(python), "-c", "import analysis; print(analysis.__file__)"],
                     cwd=tmp).strip()
        if not where.startswith(str(venv)):
            sys.exit(f"wheel check: analysis imported from {where}, not from the wheel")
        tiny_results(tmp / "runs")
        env = os.environ | {"NWS_CACHE_DIR": str(tmp / "cache")}  # as a fresh user's
        out = _run([str(python), "-m", "analysis.tables", "--results", "runs", "--benchmark",
                    "cub_to_sketches", "--out", "tables"], cwd=tmp, env=env)
        md = (tmp / "tables" / "table1_cub_to_sketches_paper.md").read_text()
        row = next((r for r in md.splitlines() if r.startswith("| finetune ")), "")
        if f"| {PAPER_AVG} (5 tasks) |" not in row:  # beside a partial row
            sys.exit(f"wheel check: the installed wheel's Table 1 lacks the paper's "
                     f"{PAPER_AVG}:\n{row or md}\n{out}")
    print(f"wheel check: {wheel.name} installed outside the checkout shows the paper's "
          f"numbers (build {built - start:.1f} s, total {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
