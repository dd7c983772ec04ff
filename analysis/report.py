"""One self-contained HTML page of a sweep: status, Tables 1-3 beside the paper, figures,
training curves and where every row came from.

    python -m analysis.report --results results/runs --benchmark B [--protocol P] [--out FILE]

Default ``--out``: ``results/tables/report_<benchmark>.html`` (beside the tables). Figures
are inline PNG (base64) and the style is inline: the page opens without a network or the
results folder, so it can be sent as one file. Sections:

- **Status**: every run folder of the benchmark as :mod:`benchmarks.status` reads it (done,
  running, partial, failed), with the last epoch's loss of unfinished runs;
- **Tables 1-3** (and the paired comparison, NWS bits) from :func:`analysis.tables.build_tables`
  with their notes, and the differences to the paper's numbers beside them (percentage points;
  "partial" where a row covers fewer tasks than the paper's);
- **Figures** from :func:`analysis.figures.build_figures`: Figure 3, Figure 4, memory growth,
  accuracy matrices;
- **Training curves**: mean loss per epoch from each run's ``epochs.csv``
  (:mod:`benchmarks.core.epoch_log`);
- **Provenance**: per table row (method, architecture): its runs, seeds, settings, suite
  commit, library versions and device, from each run's ``config.json`` and ``env.json``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from analysis.figures import build_figures
from analysis.runs import Run, load_runs, results_parser, select
from analysis.tables import Table, build_tables
from benchmarks.core.epoch_log import read_epochs
from benchmarks.exec.status import STATES, folder_statuses

VERSIONS = ("python", "torch", "torchvision", "timm", "numpy", "pandas")
STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child,table.text td{text-align:left}
td.diff{background:#f7f7ff}.done{color:#176d17}.failed{color:#b00}
.partial,.running{color:#a06000}.missing{color:#777}
ul.notes{font-size:.8em;color:#444}img{max-width:min(100%,800px);margin:.5em 0}
nav a{margin-right:1em}code{font-size:.9em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _html_table(header: list[str], rows: list[list[str]], classes: list[list[str]] | None = None,
                kind: str = "") -> str:
    """``kind="text"``: every cell left-aligned (provenance)."""
    out = [f'<table class="{kind}">' if kind else "<table>",
           "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = classes[i] if classes else [""] * len(row)
        out.append("<tr>" + "".join(f'<td class="{c}">{_e(v)}</td>' if c else f"<td>{_e(v)}</td>"
                                    for v, c in zip(row, cls, strict=True)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _png(path: Path | bytes, alt: str) -> str:
    data = path if isinstance(path, bytes) else path.read_bytes()
    return (f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode()}"><figcaption>{_e(alt)}</figcaption></figure>')


# -- status ---------------------------------------------------------------------------


def status_section(results: Path, benchmark: str) -> str:
    statuses = [s for s in folder_statuses(results) if s.name.startswith(f"{benchmark}-")]
    if not statuses:
        return "<p>No run folders of this benchmark.</p>"
    counts = ", ".join(f"{n} {s}" for s in STATES
                       if (n := sum(r.state == s for r in statuses)))
    rows, classes = [], []
    for s in statuses:
        e = s.last_epoch
        last = (f"task {int(e['task']) + 1} [{e['phase']}] epoch {int(e['epoch']) + 1}/"
                f"{int(e['epochs'])}: loss {float(e['loss']):.4f}") if e else "-"
        rows.append([s.name, s.state, f"{s.learned}/{s.planned if s.planned else '?'}",
                     "-" if s.mean_accuracy is None else f"{100 * s.mean_accuracy:.1f}",
                     last if s.state != "done" else "-", s.error or ""])
        classes.append(["", s.state, "", "", "", ""])
    return (f"<p>{_e(counts)}</p>" + _html_table(
        ["Run", "State", "Tasks", "Mean acc (%)", "Last epoch", "Error"], rows, classes))


# -- tables ---------------------------------------------------------------------------


def _diff(ours: float, paper: float) -> str:
    return "-" if any(isinstance(v, float) and math.isnan(v) for v in (ours, paper)) or (
        ours is None or paper is None) else f"{ours - paper:+.1f}"


def summary_diffs(t: Table) -> tuple[list[str], list[list[str]]]:
    """Table 1/3: accuracy minus the paper's (pp) and paper-convention MiB minus the paper's,
    per row of ``t`` (its ``data`` holds the numbers in the cells' order)."""
    rows = []
    for r in t.data.to_dict("records"):
        tag = " (partial)" if r.get("partial") else ""
        acc = _diff(r.get("acc_mean", math.nan), r.get("paper_acc", math.nan))
        mem = _diff(r.get("paper_convention_mib", math.nan), r.get("paper_mib", math.nan))
        rows.append([acc + (tag if acc != "-" else ""), mem])
    return ["Δ acc vs paper (pp)", "Δ paper conv. vs paper (MiB)"], rows


def table2_diffs(t: Table) -> str:
    """Table 2: ours minus the paper's per task (pp), one row per method with both."""
    df = t.data.dropna(subset=["acc_mean", "paper_acc"])
    if df.empty:
        return ""
    tasks = sorted(t.data.task.unique())
    rows = []
    for method, g in df.groupby("method", sort=False):
        by = dict(zip(g.task, g.acc_mean - g.paper_acc, strict=True))
        rows.append([method, *(f"{by[k]:+.1f}" if k in by else "-" for k in tasks)])
    return ("<p>Ours minus the paper, per task (pp):</p>"
            + _html_table(["Method", *[f"T{k + 1}" for k in tasks]], rows))


def table_section(t: Table) -> str:
    header, cells, classes = list(t.header), [list(c) for c in t.cells], None
    extra = ""
    if t.name.startswith(("table1_", "table3_")) and len(t.data) == len(cells):
        dh, drows = summary_diffs(t)
        header += dh
        cells = [c + d for c, d in zip(cells, drows, strict=True)]
        classes = [[""] * len(t.header) + ["diff"] * len(dh) for _ in cells]
    elif t.name.startswith("table2_"):
        extra = table2_diffs(t)
    notes = "".join(f"<li>{_e(n)}</li>" for n in t.notes)
    return (f'<h3 id="{_e(t.name)}">{_e(t.caption)}</h3>' + _html_table(header, cells, classes)
            + extra + (f'<ul class="notes">{notes}</ul>' if notes else ""))


# -- figures and curves ---------------------------------------------------------------


def figures_section(results: Path, benchmark: str, protocol: str | None) -> tuple[str, list[str]]:
    with tempfile.TemporaryDirectory(prefix="nws-report-") as tmp:
        files, messages = build_figures(results, tmp, benchmark, protocol)
        parts = [_png(f, f.stem) for f in files if f.suffix == ".png"]
    return "\n".join(parts) or "<p>No figure could be drawn.</p>", messages


def training_curves(runs: list[Run]) -> bytes | None:
    """Mean training loss per epoch (x: epochs trained so far in the run), one panel per
    method, one line per run; None when no run has an ``epochs.csv``."""
    curves = {}
    for r in runs:
        df = read_epochs(r.dir)
        if len(df):
            curves.setdefault(r.method, []).append((r, df))
    if not curves:
        return None
    n = len(curves)
    cols = min(3, n)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(3.6 * cols, 2.4 * -(-n // cols)),
                             squeeze=False)
    for ax, (method, items) in zip(axes.flat, curves.items(), strict=False):
        for r, df in items:
            ax.plot(range(1, len(df) + 1), df.loss, linewidth=1, label=f"seed {r.seed}")
            starts = df.index[(df.epoch == 0) & (df.phase_index == 0)]
            for s in starts[1:]:
                ax.axvline(s + 0.5, color="#ccc", linewidth=0.5)
        ax.set(title=method, xlabel="epoch (grey: task starts)", ylabel="mean loss",
               yscale="log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# -- provenance -----------------------------------------------------------------------


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def provenance_rows(runs: list[Run]) -> list[list[str]]:
    """Per (method, arch): runs, seeds, settings, commit(s), versions, device(s)."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.method, r.arch), []).append(r)
    rows = []
    for (method, arch), rs in groups.items():
        settings, commits, versions, devices = set(), set(), set(), set()
        for r in rs:
            cfg, env = r.config or {}, _json(r.dir / "env.json")
            identity = cfg.get("identity", {})
            overrides = (cfg.get("run_config") or {}).get("protocol_overrides") or {}
            settings.add(json.dumps({"options": identity.get("options", {}),
                                     "overrides": overrides,
                                     "pretrained": identity.get("pretrained"),
                                     "num_tasks": identity.get("num_tasks")}, sort_keys=True))
            commit = str(env.get("git_commit", "unknown"))[:12]
            commits.add(commit + ("+dirty" if env.get("git_dirty") else ""))
            versions.add(" ".join(f"{k} {env[k]}" for k in VERSIONS if k in env) or "unknown")
            devices.add(f"{env.get('device', '?')} ({env.get('device_name', '?')})")
        rows.append([f"{method}/{arch}", ", ".join(r.run_id for r in rs),
                     ", ".join(str(s) for s in sorted({r.seed for r in rs})),
                     "; ".join(sorted(settings)), ", ".join(sorted(commits)),
                     "; ".join(sorted(versions)), "; ".join(sorted(devices))])
    return rows


# -- the page -------------------------------------------------------------------------


def build_report(results: str | Path, benchmark: str, protocol: str | None = None) -> str:
    """The page's HTML (see the module doc)."""
    results = Path(results)
    runs = select(load_runs(results), benchmark=benchmark, protocol=protocol)
    tables, messages = build_tables(results, benchmark, protocol)
    figures, fig_messages = figures_section(results, benchmark, protocol) if runs else ("", [])
    curves = training_curves(runs)
    sections = [
        ("status", "Status", status_section(results, benchmark)),
        ("tables", "Tables",
         "".join(f"<p>{_e(m)}</p>" for m in messages)
         + "".join(table_section(t) for t in tables)),
        ("figures", "Figures", figures + "".join(f"<p>{_e(m)}</p>" for m in fig_messages)),
        ("curves", "Training curves",
         _png(curves, "mean training loss per epoch (epochs.csv)") if curves else
         "<p>No run has an epochs.csv (runs recorded before it existed).</p>"),
        ("provenance", "Provenance",
         _html_table(["Row", "Runs", "Seeds", "Settings", "Suite commit", "Versions",
                      "Device"], provenance_rows(runs), kind="text") if runs else
         "<p>No runs.</p>"),
    ]
    nav = "".join(f'<a href="#{key}">{_e(title)}</a>' for key, title, _ in sections)
    body = "".join(f'<h2 id="{key}">{_e(title)}</h2>\n{content}\n'
                   for key, title, content in sections)
    what = f"{benchmark}" + (f", protocol {protocol}" if protocol else "")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>NWS benchmark report: {_e(what)}</title><style>{STYLE}</style></head>"
            f"<body><h1>NWS benchmark report: {_e(what)}</h1>"
            f"<p>From <code>{_e(results.resolve())}</code>, built {_e(stamp)}.</p>"
            f"<nav>{nav}</nav>\n{body}</body></html>\n")


def main(argv: list[str] | None = None) -> int:
    p = results_parser("python -m analysis.report", __doc__, "")
    args = p.parse_args(argv)
    if args.benchmark is None:
        print("error: give --benchmark (the report is of one benchmark)", file=sys.stderr)
        return 2
    results = Path(args.results)
    if not results.is_dir():
        print(f"error: --results {results} is not a folder of run folders", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("results/tables") / f"report_{args.benchmark}.html"
    if out.is_dir():
        print(f"error: --out {out} is a folder; give a file name (e.g. {out}/report.html)",
              file=sys.stderr)
        return 2
    page = build_report(results, args.benchmark, args.protocol)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out} ({len(page.encode()) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
