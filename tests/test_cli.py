"""The fit command line: answers --help without importing torch, and a run's output is short."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, fit_cli, tiny_overrides

NO_TORCH = """
import sys
from mach_lightning import fit
try:
    fit.main(["--help"])
except SystemExit:
    pass
print("torch" in sys.modules, "lightning" in sys.modules)
"""


def test_help_answers_without_importing_torch_or_lightning():
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "--trust-checkpoint" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "False False"


def test_a_runs_output_is_its_progress_directory_and_result(tmp_path):
    proc = fit_cli(*tiny_overrides(tmp_path, "trainer.max_epochs=1", "run.id=quiet"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run directory:" in proc.stdout and "test/acc=" in proc.stdout
    noise = ("weights_only", "litlogger", "GPU available", "v_num", "logging interval")
    output = proc.stdout + proc.stderr
    assert [n for n in noise if n in output] == []


def test_tensorboard_logger_writes_event_files_beside_the_csv(tmp_path):
    import pytest

    pytest.importorskip("tensorboard")
    proc = fit_cli(
        *tiny_overrides(tmp_path, "trainer.max_epochs=1", "run.id=tb"),
        "logger.tensorboard.enabled=true",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "default" / "tb"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "lr-Adam" in header  # LearningRateMonitor's learning rates reach every logger
