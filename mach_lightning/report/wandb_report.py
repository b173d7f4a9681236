"""The W&B Report with the local report's content, through the supported Reports API
(`wandb_workspaces.reports.v2`: `pip install "mach_lightning[publish]"`).

Per table: its heading, target line and the same table (markdown), then a panel grid with one run
set per row (the row's runs by W&B id, grouped into one line with a std band over seeds; the sync
baseline is its own run set) and line plots of the report's metrics. Building the object needs no
server (entity and project are given); `Report.save()` does, and is called only by `publish`.
"""

from __future__ import annotations

from mach_lightning.report.compare import Comparison, Row, Table
from mach_lightning.report.load import Run
from mach_lightning.report.metrics import SIM, TEST, VAL
from mach_lightning.report.render import (
    LEGEND,
    PROBLEM_HEADER,
    md_table,
    problem_groups,
    problem_rows,
    table_cells,
    target_line,
)

# Lightning hands the metrics' `step` to WandbLogger as the step, logged as trainer/global_step.
STEP = "trainer/global_step"
TITLES = {VAL: "validation accuracy", "train/loss": "training loss"}
# wandb-workspaces is the `publish` extra: only --publish needs it.
INSTALL_HINT = 'pip install "mach_lightning[publish]"'


def reports_api():
    """The Reports API module, or None when wandb-workspaces is not installed."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        return None
    return wr


def runset_name(row: Row) -> str:
    return f"{row.label} baseline" if row.is_baseline else row.label


def _runset(wr, row: Row, entity: str, project: str):
    ids = [r.wandb_id for r in row.runs if r.wandb_id]
    if not ids:
        return None
    id_list = ", ".join(f"'{i}'" for i in ids)
    groupby = ["config.topology.name"] + [f"config.{k}" for k in row.setting]
    return wr.Runset(
        entity=entity,
        project=project,
        name=runset_name(row),
        filters=f"ID in [{id_list}]",
        groupby=groupby,
    )


def _logged_together(runs: list[Run], a: str, b: str) -> bool:
    return any(a in rec and b in rec for r in runs for rec in r.history)


def _cosine_keys(runs: list[Run]) -> list[str]:
    keys = {k for r in runs for rec in r.history for k in rec if k.startswith("diag/cos_c")}
    return sorted(keys, key=lambda k: int(k.rsplit("c", 1)[1]) if k[-1].isdigit() else 0)


def panels(wr, table: Table) -> list:
    """Line plots of the report's metrics (a W&B plot can only use an x logged in the same row)."""
    runs = [r for row in table.rows for r in row.runs]
    band = {"groupby_aggfunc": "mean", "groupby_rangefunc": "stddev"}
    out = [
        wr.LinePlot(
            title="validation accuracy vs batch step",
            x=STEP,
            y=[VAL],
            title_x="batch step",
            title_y="val acc",
            **band,
        ),
        wr.LinePlot(
            title="training loss vs batch step",
            x=STEP,
            y=["train/loss"],
            title_x="batch step",
            title_y="train loss",
            **band,
        ),
        wr.BarPlot(title="final test accuracy", metrics=[TEST], **band),
        wr.LinePlot(title="wall-clock ms per batch step", x=STEP, y=["time/step_ms"], **band),
    ]
    for y in TITLES:
        if _logged_together(runs, y, SIM):
            out.append(
                wr.LinePlot(
                    title=f"{TITLES[y]} vs simulated parallel time",
                    x=SIM,
                    y=[y],
                    title_x="simulated parallel time (s)",
                    **band,
                )
            )
    for key in _cosine_keys(runs):
        out.append(
            wr.LinePlot(
                title=f"gradient cosine, component {key.rsplit('c', 1)[1]}",
                x=STEP,
                y=[key],
                **band,
            )
        )
    return out


def _table_blocks(wr, table: Table, entity: str, project: str) -> list:
    header, rows, _ = table_cells(table)
    blocks = [
        wr.H2(table.title),
        wr.P(target_line(table)),
        wr.MarkdownBlock(md_table(header, rows)),
    ]
    runsets = [rs for rs in (_runset(wr, row, entity, project) for row in table.rows) if rs]
    if runsets:
        blocks.append(wr.PanelGrid(runsets=runsets, panels=panels(wr, table)))
    else:
        blocks.append(wr.P("No run of this table logged to W&B (logger.wandb.enabled=false)."))
    return blocks


def build_report(comp: Comparison, name: str, entity: str, project: str, title: str | None = None):
    """The Report object (not saved). Raises ImportError without wandb-workspaces."""
    wr = reports_api()
    if wr is None:
        raise ImportError(f"The W&B Reports API is not installed: {INSTALL_HINT}.")
    blocks = [wr.H1(title or f"Comparison report: {name}"), wr.P(LEGEND)]
    for table in comp.tables:
        blocks += _table_blocks(wr, table, entity, project)
    blocks.append(wr.H2("Problems"))
    if not comp.problems:
        blocks.append(wr.P("None: every run finished with a finite loss and has a baseline."))
    for kind, items in problem_groups(comp.problems):
        blocks += [
            wr.H3(f"{kind} ({len(items)})"),
            wr.MarkdownBlock(md_table(PROBLEM_HEADER, problem_rows(items))),
        ]
    return wr.Report(
        project=project,
        entity=entity,
        title=title or f"Comparison: {name}",
        description=f"Runs against their synchronous baselines ({name}).",
        blocks=blocks,
        width="fluid",
    )


def publish(comp: Comparison, name: str, entity: str | None, project: str) -> str:
    """Build and save the report on W&B (needs an API key and network); returns its URL."""
    if entity is None:
        import wandb

        entity = wandb.Api().default_entity
    report = build_report(comp, name, entity, project)
    report.save()
    return report.url
