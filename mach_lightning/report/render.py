"""Tables as text cells (shared by report.md, report.html and the W&B Report) and report.md."""

from __future__ import annotations

import math
import posixpath
from datetime import datetime

from mach_lightning.report.compare import Comparison, Problem, Row, Table
from mach_lightning.report.metrics import COLUMNS
from mach_lightning.report.stats import PairedDiff, Summary

DASH = "—"
MARK = "◆"
PAIRING = "vs sync"
LEGEND = (
    f"Accuracy in %: mean ± sample std over seeds. Δ: run − matched `sync` baseline, paired "
    f"by seed, in percentage points, with a 95% Student-t interval; {MARK} marks an interval "
    "that excludes zero. Steps and simulated parallel time to target: mean ± std over the "
    "seeds that reached it (reached/seeds when not all did). Wall ms/step: measured "
    "training step; sim. ms/step: simulated parallel step (one component per device). "
    f"{PAIRING}: tuning settings in which the run differs from its baseline, or why it has no Δ "
    "(a baseline must share the training budget and every other setting but the topology's own)."
)


def _num(x: float, fmt: str) -> str:
    return format(x, fmt) if math.isfinite(x) else DASH


def fmt_acc(s: Summary | None) -> str:
    if s is None:
        return DASH
    return f"{100 * s.mean:.2f}" + (f" ± {100 * s.std:.2f}" if s.n > 1 else "")


def fmt_delta(d: PairedDiff | None, n_row: int) -> str:
    if d is None:
        return DASH
    text = f"{100 * d.mean:+.2f}"
    if d.n < 2:
        return text + " (1 seed, no CI)"
    text += f" [{100 * d.lo:+.2f}, {100 * d.hi:+.2f}]"
    if d.n != n_row:
        text += f" (n={d.n})"
    return text + (f" {MARK}" if d.excludes_zero else "")


def three_digits(x: float) -> str:
    """A format with three significant digits for x, as fixed decimals (so a std lines up)."""
    if not math.isfinite(x) or x == 0:
        return ".0f"
    return f".{max(0, 2 - math.floor(math.log10(abs(x))))}f"


def fmt_reach(s: Summary | None, reached: int, n: int, target: float | None, fmt: str) -> str:
    if target is None or n == 0:
        return DASH
    if s is None:
        return f"not reached (0/{n})" if reached == 0 else DASH
    fmt = fmt or three_digits(s.mean)
    text = _num(s.mean, fmt) + (f" ± {_num(s.std, fmt)}" if s.n > 1 else "")
    return text + (f" ({reached}/{n})" if reached < n else "")


def fmt_components(row: Row) -> str:
    """'c0 98.51 ± 0.03 · c1 98.47 ± 0.05 (min 98.42)': each component alone, over seeds."""
    parts, i = [], 0
    while (summary := row.cells.get(f"component_test_c{i}")) is not None:
        parts.append(f"c{i} {fmt_acc(summary)}")
        i += 1
    if not parts:
        return DASH
    return " · ".join(parts) + f" (min {fmt_acc(row.cells.get('component_test'))})"


def cell(row: Row, key: str, kind: str) -> str:
    n = len(row.runs)
    if kind == "components":
        return fmt_components(row)
    if kind == "delta":
        return "baseline" if row.is_baseline else fmt_delta(row.deltas.get(key), n)
    summary = row.cells.get(key)
    if kind == "acc":
        return fmt_acc(summary)
    if kind == "reach":
        return fmt_reach(
            summary, row.reached, n, row.target, ".0f" if key == "steps_to_target" else ""
        )
    if summary is None:
        return DASH
    return _num(summary.mean, ".0f" if kind == "int" else ".2f")


def _seed_note(row: Row) -> str:
    notes = (
        [f"{len(row.runs) - len(row.baseline)} unpaired"]
        if len(row.baseline) < len(row.runs)
        else []
    )
    notes += [f"+{row.excluded} excluded"] if row.excluded else []
    return f" ({', '.join(notes)})" if notes else ""


def pairing_note(row: Row) -> str:
    """'lr 5e-4 (sync 1e-3)', or 'no Δ: baseline differs in trainer.max_epochs (20 vs 4)'."""
    if row.is_baseline:
        return DASH
    parts = list(row.tuned)
    for reason, seeds in row.unpaired.items():
        if len(seeds) == len(row.runs):
            parts.append(f"no Δ: {reason}")
        else:
            which = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, sorted(seeds)))}"
            parts.append(f"no Δ for {which}: {reason}")
    return "; ".join(parts) or DASH


def table_cells(table: Table) -> tuple[list[str], list[list[str]], list[bool]]:
    """(header, rows of strings, marked rows); columns empty in every row are left out."""
    header = ["topology, setting", "seeds", PAIRING] + [title for _, title, _ in COLUMNS]
    rows = []
    for row in table.rows:
        seeds = str(len(row.runs)) + _seed_note(row)
        cells = [cell(row, key, kind) for key, _, kind in COLUMNS]
        rows.append([row.label, seeds, pairing_note(row)] + cells)
    targets = {round(r.target, 6) for r in table.rows if r.target is not None}
    if len(targets) > 1:
        header.append("target val acc %")
        for out, row in zip(rows, table.rows):
            out.append(DASH if row.target is None else f"{100 * row.target:.2f}")
    keep = [i for i in range(len(header)) if i < 2 or any(r[i] != DASH for r in rows)]
    return (
        [header[i] for i in keep],
        [[r[i] for i in keep] for r in rows],
        [row.marked for row in table.rows],
    )


def target_line(table: Table) -> str:
    targets = sorted({r.target for r in table.rows if r.target is not None})
    if not targets:
        return "No target accuracy: no usable baseline (give --target-acc)."
    value = f" = {100 * targets[0]:.2f}%" if len(targets) == 1 else " (per row, last column)"
    return f"Time to target: the first logged `val/acc` reaching {table.target_note}{value}."


def signature_line(table: Table) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(table.signature.items()))


def md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = [
        "| " + " | ".join(esc(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def problem_groups(problems: list[Problem]) -> list[tuple[str, list[Problem]]]:
    kinds = list(dict.fromkeys(p.kind for p in problems))
    return [(k, [p for p in problems if p.kind == k]) for k in kinds]


def compact_runs(runs: list[str]) -> str:
    """'3 runs: runs/sw/{a, b, c}': the shared folder written once."""
    try:
        common = posixpath.commonpath([posixpath.dirname(r) for r in runs])
    except ValueError:  # absolute and relative paths mixed
        common = ""
    if common:
        names = ", ".join(posixpath.relpath(r, common) for r in runs)
        return f"{len(runs)} runs: {common}/{{{names}}}"
    return f"{len(runs)} runs: {', '.join(runs)}"


PROBLEM_HEADER = ["run", "row", "detail"]


def problem_rows(items: list[Problem]) -> list[list[str]]:
    """[run, row, detail] per distinct detail: identical failures (a sweep's jobs killed by the
    same fault) are one line with their count and runs, not one line each."""
    by_detail: dict[str, list[Problem]] = {}
    for problem in items:
        by_detail.setdefault(problem.detail, []).append(problem)
    rows = []
    for detail, same in by_detail.items():
        labels = ", ".join(dict.fromkeys(p.label for p in same))
        runs = same[0].run if len(same) == 1 else compact_runs([p.run for p in same])
        rows.append([runs, labels, detail])
    return rows


PROBLEM_NOTE = (
    "Runs in progress, failed, unreadable, diverged or repeated are kept out of every mean and "
    "difference above. Runs without a usable baseline keep their own accuracy in their row "
    "(counted as unpaired under seeds) but get no difference, the row saying why: no sync run "
    "of their seed, or none that shares their data, model, training budget and every other "
    "setting but the topology's own and the tuning keys (optim.*, shown in the row)."
)


def write_markdown(comp: Comparison, name: str, figures: dict[int, list[tuple[str, str]]]) -> str:
    """report.md's text; figures: table index -> [(caption, file name)]."""
    out = [
        f"# Comparison report: {name}",
        "",
        f"{len(comp.runs)} runs, generated {datetime.now():%Y-%m-%d %H:%M} by "
        f"`python -m mach_lightning.report`.",
        "",
        LEGEND,
        "",
    ]
    for i, table in enumerate(comp.tables):
        header, rows, _ = table_cells(table)
        out += [
            f"## {table.title}",
            "",
            f"Settings: `{signature_line(table)}`",
            "",
            target_line(table),
            "",
            md_table(header, rows),
            "",
        ]
        out += [f"![{caption}]({path})\n" for caption, path in figures.get(i, [])]
    out += ["## Problems", ""]
    if not comp.problems:
        out += ["None: every run finished with a finite loss and has a matching baseline.", ""]
    else:
        out += [PROBLEM_NOTE, ""]
    for kind, items in problem_groups(comp.problems):
        out += [
            f"### {kind} ({len(items)})",
            "",
            md_table(PROBLEM_HEADER, problem_rows(items)),
            "",
        ]
    return "\n".join(out)
