"""Checkpoints carry the simulator's in-flight state: messages, stored forwards, counters.

Under DDP each rank holds its own in-flight state (its own batches' messages and meter): every
rank's goes into the checkpoint, and each rank resumes from its own. A checkpoint written before
the core split (no `format`) loads for evaluation; resuming training from one with messages in
flight is refused with a message naming why (sim/step.py: `check_state_format`).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.trainer.states import TrainerFn

from mach_lightning.sim.rank_state import gather_from_ranks, state_of_rank
from mach_lightning.sim.step import STATE_FORMAT, check_state_format


class InFlightState:
    """topology_state_dict / load_topology_state_dict and the checkpoint hooks, for the module."""

    def topology_state_dict(self) -> dict[str, Any]:
        """In-flight state saved in checkpoints: messages, stored forwards, counters."""
        state = {
            "format": STATE_FORMAT,
            "batch_step": self.batch_step,
            "sim_clock": self.sim_clock.state_dict(),
            "meter": self._meter.state_dict(),
            "divergence": self._watch.state_dict(),
            "driver": self.driver.state_dict(),
        }
        if self.diagnostics is not None:
            state["diagnostics"] = self.diagnostics.state_dict()
        return state

    def load_topology_state_dict(self, state: dict[str, Any]) -> None:
        check_state_format(state)
        self.batch_step = int(state.get("batch_step", 0))
        self.sim_clock.load_state_dict(state.get("sim_clock", {}))
        self._meter.load_state_dict(state.get("meter", {}))
        self._watch.load_state_dict(state.get("divergence", {}))
        self.driver.load_state_dict(state.get("driver", {}))
        if self.diagnostics is not None:
            self.diagnostics.load_state_dict(state.get("diagnostics", {}))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.count_batch()  # saved from a callback's on_train_batch_end: the batch is trained
        state = self.topology_state_dict()
        checkpoint["topology_state"] = state
        if self.trainer.world_size > 1:
            checkpoint["topology_state_ranks"] = gather_from_ranks(state, self.trainer.world_size)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("topology_state", {})
        ranks = checkpoint.get("topology_state_ranks")
        world = self.trainer.world_size  # loaded by a Trainer (fit, or test of the best)
        if ranks is not None or world > 1:
            state = state_of_rank(ranks, self.global_rank, world, state)
        if state.get("format") != STATE_FORMAT and self.trainer.state.fn != TrainerFn.FITTING:
            state = {}  # evaluating an older checkpoint: its weights are all it needs
        self.load_topology_state_dict(state)
