"""Lightning overhead: the `sync` topology through `fit` against a plain hand-written PyTorch loop.

Both train the same MLP (same init, same optimizer, same in-memory MNIST batches) for the same
number of steps; repetitions are interleaved (plain, fit, plain, fit, ...) because this machine is
noisy, and the median per-step time of each is compared. Target: fit / plain <= 1.10.

    python bench/overhead.py [--steps 300] [--reps 3] [--components 1 2 4] [--mnist DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from step_clock import WARMUP, StepClock, timed_run_overrides

from mach_lightning.config import load_config
from mach_lightning.data import create_datamodule
from mach_lightning.fit import build_trainer
from mach_lightning.topologies import create_topology


def make_cfg(args, k: int, run_root: str):
    return load_config(
        None,
        [
            "data.name=mnist",
            f"data.root={args.mnist}",
            "topology.name=sync",
            f"model.num_components={k}",
            *timed_run_overrides(args.steps, run_root),
            "trainer.progress_bar=true",
        ],
    )


def time_fit(cfg, datamodule) -> float:
    model = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    trainer = build_trainer(cfg, Path(cfg.run.root) / "bench")
    clock = StepClock()
    trainer.callbacks.append(clock)
    trainer.fit(model, datamodule=datamodule)
    return (clock.end - clock.start) / (cfg.trainer.max_steps - WARMUP)


def time_plain(cfg, datamodule, batches) -> float:
    """The loop a researcher writes by hand: forward, loss, backward, one step per optimizer."""
    model = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    blocks = [c.block for c in model.components]
    optimizers = [torch.optim.Adam(b.parameters(), lr=cfg.optim.lr) for b in blocks]
    start = 0.0
    for step, (x, y) in enumerate(batches[: cfg.trainer.max_steps]):
        if step == WARMUP:
            start = time.perf_counter()
        out = x
        for block in blocks:
            out = block(out)
        loss = F.cross_entropy(out, y)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        if step % cfg.trainer.log_every_n_steps == 0:
            float(loss)  # a plain loop prints its loss now and then too
    return (time.perf_counter() - start) / (cfg.trainer.max_steps - WARMUP)


def collect_batches(datamodule, steps: int) -> list:
    batches = []
    while len(batches) < steps:
        batches.extend(datamodule.train_dataloader())
    return batches[:steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--components", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--mnist", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist")
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_root:
        rows = []
        for k in args.components:
            cfg = make_cfg(args, k, run_root)
            datamodule = create_datamodule(cfg.data, cfg.seed)
            datamodule.setup("fit")
            batches = collect_batches(datamodule, args.steps)
            plain, fit = [], []
            for _ in range(args.reps):  # interleaved, so drifts in machine load hit both
                plain.append(time_plain(cfg, datamodule, batches))
                fit.append(time_fit(cfg, datamodule))
            p, f = statistics.median(plain), statistics.median(fit)
            rows.append((k, 1000 * p, 1000 * f, f / p))
    print(f"\n{'K':>3} {'plain ms/step':>14} {'fit ms/step':>12} {'ratio':>7}")
    for k, p, f, r in rows:
        print(f"{k:>3} {p:>14.3f} {f:>12.3f} {r:>7.3f}")
    print("target: ratio <= 1.10")


if __name__ == "__main__":
    main()
