"""Export one MACH component with its student as a standalone model, and measure what it costs.

  python -m mach_lightning.export --ckpt RUN/checkpoints/last.ckpt --component 0 --out c0.pt

The file holds the run's config and the standalone module's state_dict; loading it back is one
call, `load_standalone("c0.pt")`, which rebuilds the architecture from the config (mach_lightning
must be importable) and returns an nn.Module in eval mode mapping x to logits, F_i(x) =
head_i(f_i(x, s_i(x))). The command then compares it with the full chain it was distilled from
(component i fed by its real neighbours, recursively) on the run's test split: accuracy, parameters
used, FLOPs per example (torch's FLOP counter) and measured latency at batch 1 and at the
evaluation batch size, on this machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mach_lightning.data import create_datamodule
from mach_lightning.mach import time_ms
from mach_lightning.topologies import TOPOLOGIES

FORMAT = "mach_lightning.standalone/1"


def build_topology(config: dict, input_shape, num_classes: int):
    """The topology of a saved config, freshly initialised (weights are loaded by the caller)."""
    cfg = OmegaConf.create(config)
    cfg.mach.upstream_ckpt = None  # the saved weights already hold the upstream
    return TOPOLOGIES[cfg.topology.name](cfg, tuple(input_shape), num_classes)


def load_topology(ckpt_path: str | Path):
    """A trained topology from a Lightning checkpoint of `mach_lightning.fit`, in eval mode."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    model = build_topology(hp["config"], hp["input_shape"], hp["num_classes"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def export_component(model, index: int, out_path: str | Path) -> nn.Module:
    """Save component `index` with its student; returns the standalone module."""
    if not hasattr(model, "standalone_model"):
        raise ValueError(f"Topology '{model.name}' has no standalone components (MACH only).")
    if not 0 <= index < model.num_nodes():
        raise ValueError(
            f"--component {index}: {model.name} has components 0..{model.num_nodes() - 1}."
        )
    standalone = model.standalone_model(index)
    torch.save(
        {
            "format": FORMAT,
            "config": OmegaConf.to_container(model.cfg, resolve=True),
            "input_shape": list(model.input_shape),
            "num_classes": model.num_classes,
            "component": index,
            "state_dict": standalone.state_dict(),
        },
        out_path,
    )
    return standalone


def load_standalone(path: str | Path) -> nn.Module:
    """The exported component as an nn.Module (eval mode): logits = module(x)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != FORMAT:
        raise ValueError(f"{path} is not a file written by mach_lightning.export.")
    topology = build_topology(saved["config"], saved["input_shape"], saved["num_classes"])
    module = topology.standalone_model(saved["component"])
    module.load_state_dict(saved["state_dict"])
    return module.eval()


class ChainOf(nn.Module):
    """Component i fed by its real neighbours, recursively: the model the student stands in for."""

    def __init__(self, topology, index: int):
        super().__init__()
        self.topology, self.index = topology, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.topology.chain_logits(self.index, x)


def parameters_used(model: nn.Module, x: torch.Tensor) -> int:
    """Parameters of the modules that actually run on x (each counted once)."""
    ran: set[nn.Module] = set()
    hooks = [m.register_forward_hook(lambda m, i, o: ran.add(m)) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    params = {id(p): p.numel() for m in ran for p in m.parameters(recurse=False)}
    return sum(params.values())


def flops_per_example(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    return float(counter.get_total_flops())


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    correct = seen = 0
    for x, y in loader:
        correct += int((model(x).argmax(-1) == y).sum())
        seen += len(y)
    return correct / seen


def measure(model: nn.Module, loader, sample: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        return {
            "test_acc": accuracy(model, loader),
            "params": parameters_used(model, sample),
            "flops": flops_per_example(model, sample),
            "latency_ms_batch1": time_ms(lambda: model(sample[:1]), reps=20),
            "latency_ms_batch": time_ms(lambda: model(sample), reps=5),
        }


def compare(model, index: int, data_root: str | None = None) -> dict[str, dict[str, float]]:
    """The standalone component against its full chain on the run's test split."""
    data_cfg = model.cfg.data.copy()
    if data_root:
        data_cfg.root = data_root
    datamodule = create_datamodule(data_cfg, model.cfg.seed)
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    sample = next(iter(loader))[0]
    standalone = model.standalone_model(index).eval()
    return {
        "standalone": measure(standalone, loader, sample),
        "full chain": measure(ChainOf(model, index).eval(), loader, sample),
    }


def format_report(results: dict[str, dict[str, float]], batch: int) -> str:
    lines = [
        f"{'':12} {'test acc':>9} {'params':>10} {'MFLOPs/ex':>10} {'ms (batch 1)':>13} "
        f"{f'ms (batch {batch})':>16}"
    ]
    for name, r in results.items():
        lines.append(
            f"{name:12} {r['test_acc']:9.4f} {r['params']:10,d} {r['flops'] / 1e6:10.3f} "
            f"{r['latency_ms_batch1']:13.3f} {r['latency_ms_batch']:16.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mach_lightning.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="a checkpoint of a MACH run (last.ckpt)")
    parser.add_argument("--component", type=int, default=0, help="which component (default 0)")
    parser.add_argument("--out", required=True, help="file to write the standalone model to")
    parser.add_argument("--data-root", help="where the test data lives, if not the run's data.root")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model = load_topology(args.ckpt)
    try:
        export_component(model, args.component, args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = compare(model, args.component, args.data_root)
    print(
        f"component {args.component} of {model.name} (K={model.cfg.model.num_components}) "
        f"with its student -> {args.out}; load with mach_lightning.export.load_standalone"
    )
    print(format_report(results, model.cfg.data.eval_batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
