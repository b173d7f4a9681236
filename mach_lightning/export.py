"""Export one MACH component with its student as a standalone model, and measure what it costs.

  python -m mach_lightning.export --ckpt RUN/checkpoints/last.ckpt --component 0 --out c0.pt
      [--format state_dict|torchscript|torch_export] [--no-normalize] [--threads 1]

The checkpoint is loaded without running code from it (weights_only, mach_lightning.checkpoint_io);
--trust-checkpoint loads one that needs a full unpickling, for files from a source you trust.

The exported model maps raw inputs, as the dataset's files hold them (uint8 in [0, max_value]), to
logits F_i(x) = head_i(f_i(x, s_i(x))): its first layer scales and standardises x with the training
split's mean and std that the run used (mach_lightning.export_input). --no-normalize leaves that
layer out, for callers that prepare inputs as in training. Every file records what it expects
(shape, dtype, value range, constants): `load_standalone(path).input_spec`, in words under
"expects".

--format (mach_lightning.export_formats): state_dict, the default, holds the run's config and the
weights, and `load_standalone` rebuilds the architecture from the config (mach_lightning must be
importable); torchscript (torch.jit.load) and torch_export (a .pt2 for torch.export.load) hold a
traced program that runs without mach_lightning. `load_standalone` reads all three as an
nn.Module in eval mode.

The command then loads the file back and compares it, fed the raw test split, with the full chain
it was distilled from (component i fed by its real neighbours, recursively) on the test split as
prepared in training: accuracy, parameters used, FLOPs per example (torch's FLOP counter) and
latency at batch 1 and at the evaluation batch size on this machine, as the median and IQR of
torch.utils.benchmark blocks after warm-up, with --threads torch threads
(mach_lightning.export_cost).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from mach_lightning import export_formats
from mach_lightning.checkpoint_io import load_checkpoint
from mach_lightning.config import migrate_legacy_keys
from mach_lightning.data import DataError, TensorBatchLoader, create_datamodule
from mach_lightning.export_cost import MIN_RUN_TIME, format_report, measure
from mach_lightning.export_input import (
    InputConstants,
    input_constants,
    input_spec,
    with_raw_inputs,
)
from mach_lightning.sim import create_topology

FORMAT = "mach_lightning.standalone/2"
# Files from before the input layer hold a component that expects prepared inputs, and no spec.
LEGACY_FORMAT = "mach_lightning.standalone/1"
LEGACY_SPEC = {"raw": False, "expects": "inputs prepared as in training (constants not recorded)"}


def build_topology(config: dict, input_shape, num_classes: int):
    """The topology of a saved config, freshly initialised (weights are loaded by the caller)."""
    cfg = OmegaConf.create(migrate_legacy_keys(config))  # a file from before the sections moved
    cfg.mach.upstream_ckpt = None  # the saved weights already hold the upstream
    return create_topology(cfg, tuple(input_shape), num_classes)


def topology_from(ckpt: dict):
    """The trained topology held by a loaded checkpoint of `mach_lightning.fit`, in eval mode."""
    hp = ckpt["hyper_parameters"]
    model = build_topology(hp["config"], hp["input_shape"], hp["num_classes"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def load_topology(ckpt_path: str | Path, trust: bool = False):
    """A trained topology from a Lightning checkpoint of `mach_lightning.fit`, in eval mode.
    Raises CheckpointError for a file that is not one, or (unless `trust`) that runs code."""
    return topology_from(load_checkpoint(ckpt_path, trust=trust))


def run_data(model, data_root: str | None = None):
    """The run's data module, set up: its splits and constants are the run's (same config, seed)."""
    data_cfg = model.cfg.data.copy()
    if data_root:
        data_cfg.root = data_root
    datamodule = create_datamodule(data_cfg, model.cfg.seed)
    datamodule.setup("fit")
    return datamodule


def check_component(model, index: int) -> None:
    if not hasattr(model.rule, "standalone_model"):
        raise ValueError(f"Topology '{model.name}' has no standalone components (MACH only).")
    if not 0 <= index < model.num_nodes():
        raise ValueError(
            f"--component {index}: {model.name} has components 0..{model.num_nodes() - 1}."
        )


def export_component(
    model,
    index: int,
    out_path: str | Path,
    *,
    constants: InputConstants | None = None,
    normalize: bool = True,
    fmt: str = "state_dict",
) -> nn.Module:
    """Save component `index` with its student as `fmt`, behind its input layer unless not
    `normalize`; returns the module saved, with its `input_spec`. `constants` default to those
    recomputed through the run's data module."""
    check_component(model, index)
    constants = constants or input_constants({}, run_data(model))
    spec = input_spec(constants, model.input_shape, model.cfg.data.name, raw=normalize)
    network = model.standalone_model(index).eval()
    record = {
        "format": FORMAT,
        "config": OmegaConf.to_container(model.cfg, resolve=True),
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "component": index,
        "input": spec,
        "state_dict": network.state_dict(),
    }
    module = with_raw_inputs(network, spec).eval()
    export_formats.write(fmt, module, record, out_path)
    module.input_spec = spec
    return module


def load_standalone(path: str | Path) -> nn.Module:
    """The exported component, any format, as a module in eval mode: logits = module(x), for the
    x described by `module.input_spec`."""
    record, module = export_formats.read(path)
    if record.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise ValueError(f"{path} is not a file written by mach_lightning.export.")
    spec = record.get("input", LEGACY_SPEC)
    if module is None:  # the state_dict format: rebuild the architecture, then load the weights
        topology = build_topology(record["config"], record["input_shape"], record["num_classes"])
        network = topology.standalone_model(record["component"])
        network.load_state_dict(record["state_dict"])
        module = with_raw_inputs(network, spec).eval()
    module.input_spec = spec
    return module


class ChainOf(nn.Module):
    """Component i fed by its real neighbours, recursively: the model the student stands in for."""

    def __init__(self, topology, index: int):
        super().__init__()
        self.topology, self.index = topology, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.topology.chain_logits(self.index, x)


def raw_or_prepared_test(spec: dict, datamodule) -> TensorBatchLoader:
    """The test split as `spec` wants it: the files' raw values, or as prepared in training."""
    if not spec["raw"]:
        return datamodule.test_dataloader()
    raw = datamodule.dataset.load(datamodule.data_cfg)  # the test split is the files' test set
    return TensorBatchLoader(raw.test_images, raw.test_labels, datamodule.data_cfg.eval_batch_size)


def compare(
    model,
    index: int,
    data_root: str | None = None,
    *,
    exported: nn.Module | None = None,
    datamodule=None,
    threads: int = 1,
    min_run_time: float = MIN_RUN_TIME,
) -> dict[str, dict[str, float]]:
    """The standalone component against its full chain on the run's test split. The standalone
    row measures `exported` (a loaded file) on the inputs its spec asks for, if given; else the
    component in memory. Parameters and FLOPs are always counted on the component in memory."""
    datamodule = datamodule or run_data(model, data_root)
    loader = datamodule.test_dataloader()
    sample = next(iter(loader))[0]
    network, chain = model.standalone_model(index).eval(), ChainOf(model, index).eval()
    timing = {"threads": threads, "min_run_time": min_run_time}
    if exported is None:
        standalone = measure(network, loader, sample, (network, sample), **timing)
    else:
        inputs = raw_or_prepared_test(exported.input_spec, datamodule)
        first = next(iter(inputs))[0]
        standalone = measure(exported, inputs, first, (network, sample), **timing)
    return {
        "standalone": standalone,
        "full chain": measure(chain, loader, sample, (chain, sample), **timing),
    }


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mach_lightning.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="a checkpoint of a MACH run (last.ckpt)")
    parser.add_argument("--component", type=int, default=0, help="which component (default 0)")
    parser.add_argument("--out", required=True, help="file to write the standalone model to")
    parser.add_argument(
        "--format",
        choices=export_formats.FORMATS,
        default="state_dict",
        help="what to write (default state_dict; see above)",
    )
    parser.add_argument(
        "--no-normalize",
        action="store_true",
        help="leave out the input layer: the model then expects inputs prepared as in training "
        "(the file still records the constants)",
    )
    parser.add_argument("--data-root", help="where the data lives, if not the run's data.root")
    parser.add_argument(
        "--threads", type=positive_int, default=1, help="torch threads while timing (default 1)"
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a checkpoint that needs a full unpickling, which runs any code it holds "
        "(only for files from a source you trust)",
    )
    return parser.parse_args(argv)


def print_summary(args, model, spec: dict, constants: InputConstants) -> None:
    """What was written, and what input it expects."""
    print(
        f"component {args.component} of {model.name} (K={model.cfg.model.num_components}) "
        f"with its student -> {args.out} ({args.format}); load with "
        f"mach_lightning.export.load_standalone"
    )
    print(f"input: {spec['expects']}")
    rounded = [
        None if v is None else [round(c, 4) for c in v] for v in (constants.mean, constants.std)
    ]
    print(f"constants ({constants.source}): mean {rounded[0]}, std {rounded[1]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    try:  # CheckpointError is a ValueError: a refused checkpoint ends here, with no traceback
        ckpt = load_checkpoint(args.ckpt, trust=args.trust_checkpoint)
        model = topology_from(ckpt)
        check_component(model, args.component)  # before reading any data
        datamodule = run_data(model, args.data_root)
        constants = input_constants(ckpt, datamodule)
        export_component(
            model,
            args.component,
            args.out,
            constants=constants,
            normalize=not args.no_normalize,
            fmt=args.format,
        )
        loaded = load_standalone(args.out)
    except (ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = compare(
        model, args.component, exported=loaded, datamodule=datamodule, threads=args.threads
    )
    print_summary(args, model, loaded.input_spec, constants)
    print(format_report(results, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
