"""Training metrics between log points, kept cheap enough to run at every batch step."""

from __future__ import annotations

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
        self._losses: list[torch.Tensor] = []
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, loss: torch.Tensor, logits: torch.Tensor | None, y: torch.Tensor, secs: float):
        self._losses.append(loss.detach())
        if logits is not None:
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
        if not isinstance(self.correct, int):
            out["train/acc"] = float(self.correct) / self.seen
        return out
