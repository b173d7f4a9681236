"""Comparison reports: every run against the synchronous baseline on the same data and model.

`python -m mach_lightning.report <sweep name | run directories...>` writes report.md, PNG
figures and a self-contained report.html (and, with --publish and W&B online, a W&B Report).

- `load`: run directories -> `Run` (config, metric rows, result); `wandb_io`: the same from W&B.
- `files`: a run directory's files parsed, or refused with the file and the fault (`Unreadable`).
- `compare`: tables (data/model), rows (topology x setting), baseline pairing, problems.
- `keys`: which settings a baseline must share, which may differ (tuning), which never count.
- `stats`: mean/std over seeds, paired differences with a Student-t interval, time to target.
- `render` (report.md, table cells), `html` (report.html), `figures` (PNGs),
  `wandb_report` (the W&B Report object).
"""

from mach_lightning.report.compare import Comparison, Problem, Row, Table, compare
from mach_lightning.report.load import ReportError, Run, load_local, load_run_dir

__all__ = [
    "Comparison",
    "Problem",
    "ReportError",
    "Row",
    "Run",
    "Table",
    "compare",
    "load_local",
    "load_run_dir",
]
