"""DC-ASGD (Zheng et al., 2017): delay compensation as a wrapper around any torch optimizer.

A gradient g computed at stale weights w_then and applied at w_now is corrected with a cheap
diagonal approximation of the Hessian (g * g):

    g_compensated = g + lambda * g * g * (w_now - w_then)

and handed to the wrapped optimizer (SGD, Adam, ...). With lambda = 0 the wrapper calls the wrapped
optimizer on the untouched gradient: it *is* the base optimizer, bit for bit. Optionally the
learning rate is divided by the staleness of the applied gradient for that step
(staleness-aware ASGD, Zhang et al., 2016): lr / max(1, staleness).

Usage: before each `step()`, `set_stale_weights(weights, staleness)` with one tensor (or None) per
parameter, in the order of `param_groups`; the weights are forgotten after the step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class DCASGD(torch.optim.Optimizer):
    """Delay-compensated wrapper; shares `param_groups` and `state` with the wrapped optimizer."""

    def __init__(self, base: torch.optim.Optimizer, lam: float = 0.0, lr_scaling: bool = False):
        params = [p for group in base.param_groups for p in group["params"]]
        super().__init__(params, dict(base.defaults))
        self.base, self.lam, self.lr_scaling = base, float(lam), lr_scaling
        self._share_base_state()
        self._stale: dict[torch.Tensor, torch.Tensor] = {}
        self.staleness = 0.0

    def _share_base_state(self) -> None:
        # Learning-rate schedulers and checkpoints see the base optimizer's groups and state.
        self.param_groups, self.state = self.base.param_groups, self.base.state

    def params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def set_stale_weights(
        self, weights: Sequence[torch.Tensor | None], staleness: float = 0.0
    ) -> None:
        """The weights each parameter's gradient was computed at (None: at the current ones)."""
        params = self.params()
        if len(weights) != len(params):
            raise ValueError(f"Expected {len(params)} stale weights, got {len(weights)}.")
        self._stale = {p: w for p, w in zip(params, weights) if w is not None}
        self.staleness = float(staleness)

    @torch.no_grad()
    def compensate(self) -> None:
        """g <- g + lambda * g * g * (w_now - w_then), in place, where stale weights are known."""
        if self.lam == 0.0:
            return
        for p, w_then in self._stale.items():
            if p.grad is not None:
                p.grad.addcmul_(p.grad * p.grad, p - w_then, value=self.lam)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.compensate()
        scale = 1.0 / max(1.0, self.staleness) if self.lr_scaling else 1.0
        saved_lrs = [group["lr"] for group in self.param_groups]
        if scale != 1.0:
            for group in self.param_groups:
                group["lr"] = group["lr"] * scale
        try:
            self.base.step()
        finally:
            for group, lr in zip(self.param_groups, saved_lrs):
                group["lr"] = lr
            self._stale, self.staleness = {}, 0.0
        return loss

    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base.load_state_dict(state_dict)
        self._share_base_state()
