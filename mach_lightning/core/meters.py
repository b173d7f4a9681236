"""Windowed means of named scalars, kept on the device until a log point asks for them."""

from __future__ import annotations

import torch


class WindowMeans:
    """Means of named scalars over the steps since the last log point (no host sync per step)."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def add(self, key: str, value: torch.Tensor) -> None:
        total = self.sums.setdefault(key, [0.0, 0])
        total[0], total[1] = total[0] + value.detach(), total[1] + 1

    def summary(self) -> dict[str, float]:
        out = {key: float(total) / count for key, (total, count) in self.sums.items()}
        self.sums = {}
        return out
