"""report.html: the same tables and figures as report.md in one self-contained file (the images
embedded as base64 data URIs, the style inline): it opens anywhere, also when mailed alone."""

from __future__ import annotations

import base64
from datetime import datetime
from html import escape
from pathlib import Path

from mach_lightning.report.compare import Comparison
from mach_lightning.report.metrics import COLUMNS
from mach_lightning.report.render import (
    LEGEND,
    MARK,
    PAIRING,
    PROBLEM_HEADER,
    PROBLEM_NOTE,
    problem_groups,
    problem_rows,
    signature_line,
    table_cells,
    target_line,
)

COMPONENTS = next(title for _, title, kind in COLUMNS if kind == "components")
STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
.scroll { overflow-x: auto; max-width: 100%; margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
td { white-space: nowrap; }
td.wrap { white-space: normal; min-width: 12em; max-width: 26em; overflow-wrap: break-word; }
.wrap:not(:first-child) { text-align: left; }
.text table { width: 100%; } .text th { text-align: left; }
.text td { white-space: normal; text-align: left; overflow-wrap: break-word; }
.text td:first-child { overflow-wrap: anywhere; width: 40%; }  /* run paths: one long word */
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
tr.baseline td { background: #f7f7f7; font-style: italic; }
tr.marked td { background: #fff4d6; }
figure { display: inline-block; vertical-align: top; width: 48%; margin: 0.5em 1% 0.5em 0; }
figure img { width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.note { color: #555; font-size: 0.9em; } code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _inline_code(text: str) -> str:
    """Escape text and turn `x` into <code>x</code>."""
    parts = escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def html_table(
    header: list[str],
    rows: list[list[str]],
    classes: list[str] | None = None,
    wrap: tuple[str, ...] = (),
    text: bool = False,
) -> str:
    """A table in its own horizontally scrolling box, so a wide one never widens the page; the
    columns named in `wrap` (free text) break lines, and in a `text` table every cell does."""
    classes = classes or [""] * len(rows)
    head = "".join(
        f'<th class="wrap">{escape(h)}</th>' if h in wrap else f"<th>{escape(h)}</th>"
        for h in header
    )
    tds = ['<td class="wrap">' if h in wrap else "<td>" for h in header]
    body = "".join(
        f'<tr class="{c}">' + "".join(f"{td}{escape(x)}</td>" for td, x in zip(tds, r)) + "</tr>"
        for r, c in zip(rows, classes)
    )
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="scroll{" text" if text else ""}">{table}</div>'


def image_tag(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _tables_html(comp: Comparison, out_dir: Path, figures: dict) -> list[str]:
    parts = []
    for i, table in enumerate(comp.tables):
        header, rows, marked = table_cells(table)
        classes = [
            "marked" if m else ("baseline" if r.is_baseline else "")
            for m, r in zip(marked, table.rows)
        ]
        parts += [
            f"<h2>{escape(table.title)}</h2>",
            f'<p class="note">Settings: <code>{escape(signature_line(table))}</code></p>',
            f'<p class="note">{_inline_code(target_line(table))}</p>',
            html_table(header, rows, classes, wrap=(header[0], PAIRING, COMPONENTS)),
            "<div>",
        ]
        parts += [image_tag(out_dir / name, caption) for caption, name in figures.get(i, [])]
        parts.append("</div>")
    return parts


def _problems_html(comp: Comparison) -> list[str]:
    parts = ["<h2>Problems</h2>"]
    if not comp.problems:
        return parts + [
            "<p>None: every run finished with a finite loss and has a matching baseline.</p>"
        ]
    parts.append(f'<p class="note">{escape(PROBLEM_NOTE)}</p>')
    for kind, items in problem_groups(comp.problems):
        parts += [
            f"<h3>{escape(kind)} ({len(items)})</h3>",
            html_table(PROBLEM_HEADER, problem_rows(items), text=True),
        ]
    return parts


def write_html(comp: Comparison, name: str, out_dir: Path, figures: dict) -> str:
    """The page's text; figures: table index -> [(caption, file name in out_dir)]."""
    body = [
        f"<h1>Comparison report: {escape(name)}</h1>",
        f'<p class="note">{len(comp.runs)} runs, generated {datetime.now():%Y-%m-%d %H:%M} '
        f"by <code>python -m mach_lightning.report</code>.</p>",
        f'<p class="note">{_inline_code(LEGEND)} Highlighted rows ({MARK}) differ from the '
        "baseline with 95% confidence.</p>",
    ]
    body += _tables_html(comp, out_dir, figures) + _problems_html(comp)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Report: {escape(name)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
