"""Checkpoints written before the core split: their weights load; resuming their in-flight state
is refused with a message naming why, before anything in the run directory changes."""

from __future__ import annotations

import pytest
import torch

from mach_lightning.export import load_topology
from mach_lightning.sim.step import STATE_FORMAT, StateFormatError, check_state_format
from tests.conftest import fit_cli, tiny_overrides
from tests.test_run_safety import assert_refused, snapshot

DELAYED = ("topology.name=delayed", "staleness.schedule=constant", "staleness.k=2")


def cli(tmp_path, *extra: str):
    return fit_cli(*tiny_overrides(tmp_path, "model.width=32", "model.embedding_dim=16", *extra))


@pytest.fixture
def old_run(tmp_path):
    """A delayed run whose last.ckpt is rewritten into the layout of the old per-method queues."""
    proc = cli(tmp_path, "run.id=old", "trainer.max_epochs=1", *DELAYED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "default" / "old"
    path = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["topology_state"]
    assert state["format"] == STATE_FORMAT and state["driver"]["stored"]  # in flight: k=2
    ckpt["topology_state"] = {
        "batch_step": state["batch_step"],
        "queue": [{"key": [state["batch_step"] - 1, 0], "due": state["batch_step"] + 1}],
    }
    torch.save(ckpt, path)
    return tmp_path, run_dir


def test_resuming_an_old_checkpoint_with_messages_in_flight_is_refused_untouched(old_run):
    tmp_path, run_dir = old_run
    before = snapshot(run_dir)
    proc = cli(tmp_path, "run.id=old", "resume=true", "trainer.max_epochs=2", *DELAYED)
    assert_refused(proc, "older mach_lightning", "queue", "its weights still load")
    assert snapshot(run_dir) == before


def test_an_old_checkpoint_still_loads_for_evaluation_and_export(old_run):
    _, run_dir = old_run
    model = load_topology(run_dir / "checkpoints" / "last.ckpt")
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_state_without_messages_in_flight_needs_no_format():
    check_state_format({})
    check_state_format({"batch_step": 3, "queue": []})  # nothing in flight: nothing lost
    with pytest.raises(StateFormatError, match="stored"):
        check_state_format({"batch_step": 3, "stored": [{"key": [1, 0]}]})
