"""The exported model's first layer: raw dataset values in, the inputs the network trained on out.

The data module scales the dataset's values (uint8 in [0, max_value], as its files hold them) to
[0, 1] and, with data.normalize, standardises each channel with the training split's mean and std.
A standalone component expects that prepared input; `RawInputs` repeats the data module's
arithmetic in the same order, so an exported model fed raw values predicts exactly what the run
evaluated. The constants are read from the checkpoint when the run saved its data module's state
(SAVED_STATE), otherwise recomputed from the run's config through the data module: the training
split is drawn with the run's seed, so they are the constants the run used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Lightning keeps a data module's state_dict() in the checkpoint under the class's name. Ours saves
# none yet; once InMemoryDataModule.state_dict() returns these keys, export reads them from there.
SAVED_STATE = "InMemoryDataModule"
SAVED_KEYS = ("max_value", "channel_mean", "channel_std")


@dataclass(frozen=True)
class InputConstants:
    """x / max_value, then (x - mean) / std per channel when mean is not None; and their origin."""

    max_value: float
    mean: list[float] | None
    std: list[float] | None
    source: str


def _as_list(values) -> list[float] | None:
    return None if values is None else torch.as_tensor(values, dtype=torch.float32).tolist()


def input_constants(ckpt: dict, datamodule) -> InputConstants:
    """The run's input constants: saved in `ckpt` if it has them, else from `datamodule.setup`."""
    saved = ckpt.get(SAVED_STATE) or {}
    if all(key in saved for key in SAVED_KEYS):
        mean, std = _as_list(saved["channel_mean"]), _as_list(saved["channel_std"])
        return InputConstants(float(saved["max_value"]), mean, std, "saved in the checkpoint")
    datamodule.setup("fit")  # a no-op after an earlier setup: the splits are computed once
    raw = datamodule.dataset.load(datamodule.data_cfg)  # parsed once per process, cached
    source = (
        f"recomputed from the run's config: {datamodule.data_cfg.name} training split "
        f"drawn with seed {datamodule.seed}"
    )
    mean, std = _as_list(datamodule.channel_mean), _as_list(datamodule.channel_std)
    return InputConstants(float(raw.max_value), mean, std, source)


def input_spec(constants: InputConstants, input_shape, dataset: str, raw: bool) -> dict:
    """What the exported file expects, as plain values (saved in the file, shown to its users)."""
    shape = ["N", *input_shape]
    steps = f"x / {constants.max_value:g}"
    if constants.mean is not None:
        steps += ", then (x - mean) / std per channel"
    spec = {
        "raw": raw,
        "dataset": dataset,
        "shape": shape,
        "max_value": constants.max_value,
        "mean": constants.mean,
        "std": constants.std,
        "constants_source": constants.source,
    }
    if raw:
        spec |= {
            "dtype": "uint8",
            "range": [0, constants.max_value],
            "expects": f"raw {dataset} values as its files hold them: uint8 {shape} in "
            f"[0, {constants.max_value:g}] (other dtypes are converted to float32, except by a "
            f"torch_export file, which takes uint8 only); the model applies {steps} itself",
        }
    else:
        spec |= {
            "dtype": "float32",
            "range": None,
            "expects": f"float32 {shape} prepared as in training: {steps}, "
            "with the mean and std recorded here",
        }
    return spec


class RawInputs(nn.Module):
    """The data module's scaling and standardisation as a layer (constants from `input_spec`)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.max_value = float(spec["max_value"])
        self.standardise = spec["mean"] is not None
        if self.standardise:
            self.register_buffer("mean", torch.tensor(spec["mean"]).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(spec["std"]).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same operations, same order as InMemoryDataModule.setup: bit-identical network inputs.
        x = x.to(torch.float32).div(self.max_value)
        if self.standardise:
            x = x.sub(self.mean).div(self.std)
        return x


def with_raw_inputs(network: nn.Module, spec: dict) -> nn.Module:
    """network behind the input layer the spec asks for (none when it expects prepared inputs)."""
    return nn.Sequential(RawInputs(spec), network) if spec["raw"] else network


def example_input(spec: dict, batch: int = 2) -> torch.Tensor:
    """A batch of the spec's dtype and shape, to trace or export with (batch >= 2: not fixed)."""
    shape = (batch, *spec["shape"][1:])
    if spec["raw"]:
        return torch.randint(0, int(spec["max_value"]) + 1, shape, dtype=torch.uint8)
    return torch.randn(shape)
