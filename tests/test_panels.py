"""W&B panel sections per component for dist runs (mach_lightning/panels.py), and their reverse."""

from __future__ import annotations

import csv
import json
import os
import re

import pytest

from mach_lightning.panels import panel_name, simulator_name
from mach_lightning.report.wandb_io import from_wandb_run

from .conftest import fit_cli, tiny_overrides
from .test_report import FakeWandbRun


@pytest.mark.parametrize(
    ("key", "panel"),
    [
        ("time/real_step_ms_c0", "c0/time/real_step_ms"),
        ("time/wait_frac_c12", "c12/time/wait_frac"),
        ("diag/staleness_c1", "c1/diag/staleness"),
        ("diag/staleness_hist_c1_d2", "c1/diag/staleness_hist_d2"),
        ("diag/late_input_frac_c0", "c0/diag/late_input_frac"),
        ("val/acc_c1", "c1/val/acc"),
        ("link/mb_per_s_c0-c1", "c0/link/mb_per_s_to_c1"),
        ("link/msgs_per_s_c2-c0", "c2/link/msgs_per_s_to_c0"),
        # not per component: their own sections, as in a simulated run
        ("train/loss", "train/loss"),
        ("val/acc", "val/acc"),
        ("synth/loss_b0", "synth/loss_b0"),
        ("lr-Adam-1", "lr-Adam-1"),
        ("trainer/global_step", "trainer/global_step"),
        ("time/dist_elapsed_s", "time/dist_elapsed_s"),
    ],
)
def test_per_component_metrics_get_a_section_of_their_own_and_come_back(key, panel):
    assert panel_name(key) == panel
    assert simulator_name(panel) == key


def test_report_reads_a_dist_run_from_wandb_under_the_simulators_names():
    history = [{"_step": 0, "trainer/global_step": 10, "c0/time/real_step_ms": 7.5,
                "c1/diag/staleness_hist_d2": 3.0, "c0/link/mb_per_s_to_c1": 1.5}]  # fmt: skip
    wrun = FakeWandbRun("r", "delayed", 0, 0.9, history=history)
    wrun.config["runtime"] = {"name": "dist"}
    wrun.summary["c1/val/acc"] = 0.8
    run = from_wandb_run(wrun, "me", "p")
    assert run.history[0]["time/real_step_ms_c0"] == 7.5
    assert run.history[0]["diag/staleness_hist_c1_d2"] == 3.0
    assert run.history[0]["link/mb_per_s_c0-c1"] == 1.5
    assert run.result["val/acc_c1"] == 0.8


@pytest.mark.slow
def test_a_dist_runs_wandb_offline_run_has_a_section_per_component(tmp_path):
    """A real 2-process mach_seq run with W&B offline: its per-component metrics are recorded
    in the offline run under c0/ and c1/, and every name of the run's metrics.csv maps there
    and back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HOME=str(tmp_path))
    overrides = tiny_overrides(tmp_path, "runtime.name=dist", "model.num_components=2",
                               "topology.name=mach_seq", "trainer.max_steps=6",
                               "trainer.test_after_fit=false")  # fmt: skip
    overrides = [o for o in overrides if not o.startswith("logger.wandb.enabled")]
    proc = fit_cli(*overrides, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next((tmp_path / "runs" / "default").iterdir())
    (data,) = run_dir.glob("wandb/offline-run-*/*.wandb")
    recorded = data.read_bytes()
    for i in (0, 1):
        for name in ("time/real_step_ms", "time/wait_frac", "val/acc"):
            assert f"c{i}/{name}".encode() in recorded
        assert f"time/real_step_ms_c{i}".encode() not in recorded
    assert b"c0/link/mb_per_s_to_c1" in recorded and b"link/mb_per_s_c0-c1" not in recorded
    with open(run_dir / "metrics.csv", newline="") as file:
        keys = set(next(csv.reader(file)))
    keys |= set(json.loads((run_dir / "result.json").read_text()))
    per_component = {k for k in keys if re.search(r"_c\d+", k)}
    assert {"time/real_step_ms_c0", "val/acc_c1"} <= per_component
    for key in keys:
        assert simulator_name(panel_name(key)) == key
        assert (panel_name(key) != key) == (key in per_component), key
