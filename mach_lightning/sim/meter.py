"""Training metrics between log points, kept cheap enough to run at every batch step."""

from __future__ import annotations

import math

import torch


class TrainMeter:
    """Training loss, accuracy and step time between log points, without host syncs.

    Each step only keeps references to its loss, logits and labels; the sums are taken for many
    steps at once (at the log point, or every `flush_every` steps to bound memory). A handful of
    tiny tensor ops per step would cost more than the whole bookkeeping on a small model.
    """

    def __init__(self, flush_every: int = 32):
        self.flush_every = flush_every
        self.reset()

    def reset(self):
        self.loss_sum, self.correct, self.seen, self.steps, self.seconds = 0.0, 0, 0, 0, 0.0
        self.has_accuracy = False
        self._losses: list[torch.Tensor] = []
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, loss: torch.Tensor, logits: torch.Tensor | None, y: torch.Tensor, secs: float):
        self._losses.append(loss.detach())
        if logits is not None:
            self.has_accuracy = True
            self._logits.append(logits.detach())
            self._labels.append(y)
        self.seen += y.shape[0]
        self.steps += 1
        self.seconds += secs
        if len(self._losses) >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        if self._losses:
            self.loss_sum = self.loss_sum + torch.stack(self._losses).sum()
        if self._logits:
            hits = torch.cat(self._logits).argmax(-1) == torch.cat(self._labels)
            self.correct = self.correct + hits.sum()
        self._losses, self._logits, self._labels = [], [], []

    def summary(self) -> dict[str, float]:
        self._flush()
        out = {
            "train/loss": float(self.loss_sum) / self.steps,
            "time/step_ms": 1000.0 * self.seconds / self.steps,
            "time/samples_per_s": self.seen / max(self.seconds, 1e-9),
        }
        if self.has_accuracy:
            out["train/acc"] = float(self.correct) / self.seen
        return out

    def state_dict(self) -> dict:
        """The window so far, so the first row after a resume averages the same steps. Pending
        losses stay unsummed: a resumed run then adds them in the same groups, to the last bit."""
        if self._logits:  # integer counts: exact in any grouping
            hits = torch.cat(self._logits).argmax(-1) == torch.cat(self._labels)
            self.correct = self.correct + hits.sum()
            self._logits, self._labels = [], []
        keys = ("loss_sum", "correct", "seen", "steps", "seconds", "has_accuracy")
        state = {k: getattr(self, k) for k in keys}
        state["pending_losses"] = torch.stack(self._losses) if self._losses else None
        return state

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        if not state:  # a checkpoint from before the window was saved
            return
        self.loss_sum, self.correct = state["loss_sum"], state["correct"]
        self.seen, self.steps = int(state["seen"]), int(state["steps"])
        self.seconds, self.has_accuracy = float(state["seconds"]), bool(state["has_accuracy"])
        pending = state.get("pending_losses")
        self._losses = list(pending.unbind()) if pending is not None else []


class DivergenceWatch:
    """Flags a run whose logged train/loss is non-finite or exceeds `factor` times the loss of
    its first batch, taken before any update (factor 0: non-finite only). A loss of 1e31 is
    finite but no longer learning; the run stops and result.json says `diverged`. Checked at
    log points only, where the loss is on the host anyway."""

    def __init__(self, factor: float):
        self.factor, self.first, self.diverged = factor, None, ""

    def check(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            self.diverged = f"train/loss is {loss} at step {step}"
        elif self.factor > 0 and math.isfinite(self.first) and loss > self.factor * self.first:
            self.diverged = (
                f"train/loss {loss:.4g} at step {step} exceeds {self.factor:g} x its first "
                f"value {self.first:.4g} (trainer.divergence_factor)"
            )

    def state_dict(self) -> dict:
        return {"first": self.first, "diverged": self.diverged}

    def load_state_dict(self, state: dict) -> None:
        self.first, self.diverged = state.get("first"), state.get("diverged", "")
