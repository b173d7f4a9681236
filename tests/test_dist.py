"""The multi-process runtime (runtime.name=dist): real processes over gloo, against the simulator.

Lockstep mode must run the simulator's maths: every method's per-step training losses with one
process per component equal the committed golden losses of the simulator (tests/golden/), within
float tolerance (each process sums its own gradients, in its own order).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mach_lightning.config import ConfigError, load_config
from mach_lightning.fit import EXIT_DIST
from mach_lightning.methods import list_topologies
from mach_lightning.training import run_fit

from .conftest import tiny_overrides
from .test_fit import column, read_metrics
from .test_golden import GOLDEN_STEPS, assert_matches_golden

pytestmark = pytest.mark.timeout(300)


def dist_cfg(tmp_path, *extra: str):
    return load_config(
        None,
        tiny_overrides(
            tmp_path,
            "runtime.name=dist",
            "runtime.timeout_s=60",
            "seed=0",
            f"trainer.max_steps={GOLDEN_STEPS}",
            "trainer.log_every_n_steps=1",
            "trainer.deterministic=true",
            "trainer.test_after_fit=false",
            *extra,
        ),
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list_topologies())
def test_lockstep_equals_simulator_golden(name, tmp_path):
    result = run_fit(dist_cfg(tmp_path, f"topology.name={name}", "model.num_components=3"))
    assert_matches_golden(name, column(read_metrics(result["run_dir"]), "train/loss"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["delayed", "mach_seq"])
def test_two_processes_equal_the_simulator(name, tmp_path):
    """K=2: the same config through both runtimes, side by side on this machine."""
    extra = (f"topology.name={name}", "model.num_components=2")
    dist_run = run_fit(dist_cfg(tmp_path / "dist", *extra))
    sim_run = run_fit(dist_cfg(tmp_path / "sim", *extra, "runtime.name=sim"))
    dist_losses = column(read_metrics(dist_run["run_dir"]), "train/loss")
    sim_losses = column(read_metrics(sim_run["run_dir"]), "train/loss")
    assert len(dist_losses) == GOLDEN_STEPS
    assert dist_losses == pytest.approx(sim_losses, rel=1e-5, abs=1e-6)
    # the same run directory as a simulated run, plus one directory per component process
    run_dir = Path(dist_run["run_dir"])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "finished" and result["step"] == GOLDEN_STEPS
    assert 0.0 <= result["val/acc"] <= 1.0
    for rank in range(2):
        component = run_dir / "components" / f"c{rank}"
        assert (component / "weights.pt").is_file() and (component / "metrics.csv").is_file()
        assert f"time/real_step_ms_c{rank}" in result
        assert 0.0 <= result[f"time/wait_frac_c{rank}"] <= 1.0
    assert result["link/mb_per_s_c0-c1"] > 0 and result["link/mb_per_s_c1-c0"] > 0


def start_long_run(tmp_path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """`fit` with runtime.name=dist in its own process, trained long enough to be stopped."""
    overrides = tiny_overrides(
        tmp_path,
        "runtime.name=dist",
        "topology.name=delayed",
        "model.num_components=3",
        "trainer.max_epochs=1000",
        "trainer.log_every_n_steps=1",
        "run.id=long",
        *extra,
    )
    command = [sys.executable, "-m", "mach_lightning.fit", *overrides]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "default" / "long"
    deadline = time.monotonic() + 120
    while not all((run_dir / "components" / f"c{r}" / "metrics.csv").is_file() for r in range(3)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the component processes never started training"
        time.sleep(0.2)
    return proc, run_dir


def component_pids(run_dir: Path) -> list[int]:
    return [int((run_dir / "components" / f"c{r}" / "pid").read_text()) for r in range(3)]


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        pytest.fail(f"component process {pid} is still running")


@pytest.mark.slow
def test_a_killed_component_is_named_and_no_process_is_left(tmp_path):
    proc, run_dir = start_long_run(tmp_path)
    pids = component_pids(run_dir)
    started = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_DIST, err
    assert time.monotonic() - started < 30
    assert "component process 1" in err and "killed by signal 9" in err, err
    assert_gone(pids)
    assert not (run_dir / "result.json").exists()


@pytest.mark.slow
def test_a_hung_component_is_named_within_the_timeout(tmp_path):
    proc, run_dir = start_long_run(tmp_path, "runtime.timeout_s=4")
    pids = component_pids(run_dir)
    started = time.monotonic()
    os.kill(pids[2], signal.SIGSTOP)  # alive, silent: only a timeout finds it
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        for pid in pids:  # a stopped process the coordinator failed to end would linger
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == EXIT_DIST, err
    assert 4 <= time.monotonic() - started < 40
    assert "component process 2" in err and "stopped answering" in err, err
    assert "runtime.timeout_s=4" in err
    assert_gone(pids)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("runtime.mode=free", "runtime.mode=free is not built yet"),
        ("trainer.precision=bf16-mixed", "trainer.precision=bf16-mixed is for the simulator"),
        ("trainer.devices=2", "trainer.devices=2 is for the simulator"),
        ("runtime.timeout_s=0", "runtime.timeout_s must be positive"),
    ],
)
def test_dist_settings_the_runtime_cannot_honour_are_refused(override, expected, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        dist_cfg(tmp_path, override)
