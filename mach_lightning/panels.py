"""W&B panel sections per component for `runtime.name=dist` runs.

W&B groups a workspace's charts into sections by the part of a metric's name before the first
"/". The simulator's names put the kind first (`time/real_step_ms_c0`), so a dist run's workspace
would mix every process in one `time` section. In W&B only, a dist run's per-component metrics
go to one section per component process instead:

    time/real_step_ms_c0          ->  c0/time/real_step_ms
    diag/staleness_hist_c1_d2     ->  c1/diag/staleness_hist_d2
    val/acc_c1                    ->  c1/val/acc
    link/mb_per_s_c0-c1           ->  c0/link/mb_per_s_to_c1

Everything else (train/loss, val/acc, synth/loss_b0, ...) keeps its name and section. The run's
metrics.csv and result.json keep the simulator's names; `simulator_name` reverses the mapping,
so `report --source wandb` reads a dist run under the names a simulated run has.
"""

from __future__ import annotations

import re

from lightning.pytorch.loggers import WandbLogger

_PER_COMPONENT = re.compile(r"^(?P<kind>[^/]+)/(?P<name>[^/]+?)_c(?P<i>\d+)(?P<bucket>_d\d+)?$")
_LINK = re.compile(r"^link/(?P<name>[^/]+)_c(?P<i>\d+)-c(?P<j>\d+)$")
_SECTION = re.compile(r"^c(?P<i>\d+)/(?P<kind>[^/]+)/(?P<name>[^/]+)$")
_TO = re.compile(r"^(?P<name>.+)_to_c(?P<j>\d+)$")
_BUCKET = re.compile(r"^(?P<name>.+)(?P<bucket>_d\d+)$")


def panel_name(key: str) -> str:
    """The W&B name of a dist run's metric: per-component metrics in their component's section."""
    link = _LINK.match(key)
    if link:
        return f"c{link['i']}/link/{link['name']}_to_c{link['j']}"
    m = _PER_COMPONENT.match(key)
    if m is None or (m["bucket"] and m["kind"] != "diag"):  # buckets: staleness histograms'
        return key
    return f"c{m['i']}/{m['kind']}/{m['name']}{m['bucket'] or ''}"


def simulator_name(key: str) -> str:
    """The inverse of `panel_name`: the name the run's metrics.csv (and a simulated run) uses."""
    m = _SECTION.match(key)
    if m is None:
        return key
    i, kind, name = m["i"], m["kind"], m["name"]
    if kind == "link" and (to := _TO.match(name)):
        return f"link/{to['name']}_c{i}-c{to['j']}"
    if kind == "diag" and (bucket := _BUCKET.match(name)):  # a histogram's bucket, _d<delay>
        return f"diag/{bucket['name']}_c{i}{bucket['bucket']}"
    return f"{kind}/{name}_c{i}"


def panel_metrics(metrics: dict) -> dict:
    return {panel_name(k): v for k, v in metrics.items()}


def simulator_metrics(metrics: dict) -> dict:
    return {simulator_name(k): v for k, v in metrics.items()}


class ComponentPanelsWandbLogger(WandbLogger):
    """Lightning's WandbLogger, logging each metric under its `panel_name`."""

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(panel_metrics(metrics), step)
