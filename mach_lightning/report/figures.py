"""The report's PNG figures (matplotlib, Agg): one set per table.

- validation accuracy against batch step and against simulated parallel time: one line per row
  (mean over seeds, band = ± one sample std), the sync baseline black and dashed;
- final test accuracy against delay, for rows with a constant delay (staleness sweeps);
- gradient cosine per component (`diag/cos_c{i}`), where the runs logged it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mach_lightning.report.compare import Comparison, Row, Table  # noqa: E402
from mach_lightning.report.load import Run  # noqa: E402
from mach_lightning.report.metrics import SIM, VAL  # noqa: E402

COS = re.compile(r"^diag/cos_c(\d+)$")
DELAY_KEYS = ("staleness.delay", "staleness.k")
X_LABELS = {"step": "batch step", "sim": "simulated parallel time (s)"}


def curve(run: Run, key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray] | None:
    """(x, y) of one run's metric against step, or against simulated time (interpolated)."""
    steps, values = run.series(key)
    if not steps:
        return None
    if x == "step":
        return np.asarray(steps), np.asarray(values)
    sim_steps, sim = run.series(SIM)
    if not sim_steps:
        return None
    return np.interp(steps, sim_steps, sim), np.asarray(values)


def band(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sample std over curves on the union of their x values (each within its range)."""
    grid = np.unique(np.concatenate([c[0] for c in curves]))
    stack = np.full((len(curves), len(grid)), np.nan)
    for i, (xs, ys) in enumerate(curves):
        inside = (grid >= xs.min()) & (grid <= xs.max())
        stack[i, inside] = np.interp(grid[inside], xs, ys)
    counts = np.sum(~np.isnan(stack), axis=0)
    mean = np.nanmean(stack, axis=0)
    centred = np.where(np.isnan(stack), 0.0, stack - mean)
    std = np.where(counts > 1, np.sqrt(np.sum(centred**2, axis=0) / np.maximum(counts - 1, 1)), 0.0)
    return grid, mean, std


def _style(row: Row, index: int) -> dict:
    if row.is_baseline:
        return {"color": "black", "linestyle": "--", "linewidth": 2.0}
    return {"color": plt.get_cmap("tab10")(index % 10), "linestyle": "-", "linewidth": 1.6}


def _plot_rows(ax, rows: list[Row], key: str, x: str, scale: float = 1.0) -> int:
    drawn = 0
    for i, row in enumerate(rows):
        curves = [c for c in (curve(r, key, x) for r in row.runs) if c is not None]
        if not curves:
            continue
        grid, mean, std = band(curves)
        style = _style(row, i)
        label = f"{row.label} baseline" if row.is_baseline else row.label
        ax.plot(grid, scale * mean, label=f"{label}, n={len(curves)}", **style)
        ax.fill_between(
            grid,
            scale * (mean - std),
            scale * (mean + std),
            color=style["color"],
            alpha=0.15,
            linewidth=0,
        )
        drawn += 1
    return drawn


def _finish(fig, ax, path: Path, title: str, n_lines: int) -> None:
    ax.set_title(title, fontsize=11)
    if ax.get_xscale() == "linear" and "step" in ax.get_xlabel():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if n_lines > 5:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_accuracy(table: Table, x: str, path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    drawn = _plot_rows(ax, table.rows, VAL, x, scale=100.0)
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel("validation accuracy (%), mean ± std")
    _finish(fig, ax, path, f"{table.title}: validation accuracy vs {X_LABELS[x]}", drawn)
    return True


def delay_of(run: Run) -> float | None:
    if "staleness.delay" in run.config:
        return float(run.config["staleness.delay"])
    if run.config.get("staleness.schedule") == "constant" and "staleness.k" in run.config:
        return float(run.config["staleness.k"])
    return None


def _delay_series(table: Table) -> dict[str, list[tuple[float, float, float]]]:
    """Line label -> [(delay, mean final test acc, std)] for rows with a constant delay."""
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for row in table.rows:
        delays = {delay_of(r) for r in row.runs}
        summary = row.cells.get("final_test")
        if row.is_baseline or len(delays) != 1 or None in delays or summary is None:
            continue
        rest = {k: v for k, v in row.setting.items() if k not in DELAY_KEYS}
        label = row.topology + "".join(f", {k.split('.')[-1]}={v}" for k, v in rest.items())
        std = summary.std if math.isfinite(summary.std) else 0.0
        lines.setdefault(label, []).append((delays.pop(), summary.mean, std))
    return {k: sorted(v) for k, v in lines.items() if len(v) > 1}


def plot_delay(table: Table, path: Path) -> bool:
    lines = _delay_series(table)
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    delays: set[float] = set()
    for i, (label, points) in enumerate(sorted(lines.items())):
        d, m, s = (np.array(v) for v in zip(*points))
        ax.errorbar(
            d,
            100 * m,
            yerr=100 * s,
            marker="o",
            capsize=3,
            label=label,
            color=plt.get_cmap("tab10")(i % 10),
        )
        delays.update(d.tolist())
    for row in (r for r in table.rows if r.is_baseline and r.cells.get("final_test")):
        base = row.cells["final_test"]
        std = base.std if math.isfinite(base.std) else 0.0
        ax.axhline(100 * base.mean, color="black", linestyle="--", label=f"{row.label} baseline")
        ax.axhspan(100 * (base.mean - std), 100 * (base.mean + std), color="black", alpha=0.08)
    if min(delays) > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(delays), [f"{d:g}" for d in sorted(delays)])
    ax.minorticks_off()
    ax.set_xlabel("delay (batch steps, every component)")
    ax.set_ylabel("final test accuracy (%), mean ± std")
    _finish(fig, ax, path, f"{table.title}: final test accuracy vs delay", len(lines) + 1)
    return True


def plot_cosine(table: Table, path: Path) -> bool:
    keys = {k for row in table.rows for r in row.runs for rec in r.history for k in rec}
    comps = sorted(int(m.group(1)) for m in map(COS.match, keys) if m)
    if not comps:
        return False
    ncols = min(len(comps), 4)
    nrows = math.ceil(len(comps) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.6 * ncols + 1.5, 3.8 * nrows + 0.4), squeeze=False, sharey=True
    )
    for ax, comp in zip(axes.flat, comps):
        _plot_rows(ax, table.rows, f"diag/cos_c{comp}", "step")
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"component {comp}", fontsize=10)
        ax.set_xlabel("batch step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(comps) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("cos(applied, sync gradient)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        fontsize=8,
        ncol=min(3, max(1, len(labels))),
        frameon=False,
    )
    fig.suptitle(f"{table.title}: gradient cosine per component", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60]


def make_figures(comp: Comparison, out_dir: Path) -> dict[int, list[tuple[str, str]]]:
    """Write every figure into out_dir; returns table index -> [(caption, file name)]."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[int, list[tuple[str, str]]] = {}
    for i, table in enumerate(comp.tables):
        stem = f"t{i + 1}-{slug(table.title)}"
        plots = [
            (
                "validation accuracy vs batch step",
                f"{stem}-val-acc-step.png",
                lambda p, t=table: plot_accuracy(t, "step", p),
            ),
            (
                "validation accuracy vs simulated parallel time",
                f"{stem}-val-acc-simtime.png",
                lambda p, t=table: plot_accuracy(t, "sim", p),
            ),
            (
                "final test accuracy vs delay",
                f"{stem}-acc-vs-delay.png",
                lambda p, t=table: plot_delay(t, p),
            ),
            (
                "gradient cosine per component",
                f"{stem}-grad-cosine.png",
                lambda p, t=table: plot_cosine(t, p),
            ),
        ]
        figures[i] = [(caption, name) for caption, name, draw in plots if draw(out_dir / name)]
    return figures
