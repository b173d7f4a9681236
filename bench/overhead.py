"""Lightning overhead: the `sync` topology through `fit` against a plain hand-written PyTorch loop.

All train the same MLP (same init, same optimizer) on the same in-memory MNIST batches, which
each loop takes from the datamodule's loader as it goes (indexing the tensors in memory, as a
hand-written loop would), for the same number of steps. This machine is noisy, so every
repetition runs all variants back to back (order reversed every other repetition), ratios are
taken within a repetition, and the median over repetitions is printed.
Target: fit / plain <= 1.10.

  plain  the hand-written loop: forward, loss, backward, one step per optimizer
  bare   the same work as a minimal LightningModule, written the way Lightning documents manual
         optimization (manual_backward, LightningOptimizer.step), through a bare Trainer with no
         logger, checkpoint or progress bar: what any Lightning manual-optimization loop pays
  fit    `fit` with the sync topology: loggers, checkpoints, progress bar, train metrics, and the
         lean backward/step path (mach_lightning/sim/lean_steps.py)
  full   `fit` with trainer.lean_steps=false: Lightning's full backward/step path

    python bench/overhead.py [--steps 500] [--reps 7] [--components 1 2 4] [--batch-size 128]
                             [--mnist DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from omegaconf import OmegaConf
from step_clock import WARMUP, StepClock, timed_run_overrides

from mach_lightning.config import load_config
from mach_lightning.data import create_datamodule
from mach_lightning.fit import build_trainer
from mach_lightning.sim import create_topology


def make_cfg(args, k: int, run_root: str):
    return load_config(
        None,
        [
            "data.name=mnist",
            f"data.root={args.mnist}",
            "topology.name=sync",
            f"model.num_components={k}",
            *timed_run_overrides(args.steps, run_root),
            f"data.batch_size={args.batch_size}",
            "trainer.progress_bar=true",
        ],
    )


def time_fit(cfg, datamodule) -> float:
    model = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    trainer = build_trainer(cfg, Path(cfg.run.root) / "bench")
    clock = StepClock(model)
    trainer.fit(model, datamodule=datamodule)
    return (clock.end - clock.start) / (cfg.trainer.max_steps - WARMUP)


def time_plain(cfg, datamodule) -> float:
    """The loop a researcher writes by hand: forward, loss, backward, one step per optimizer."""
    model = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    blocks = [c.block for c in model.components]
    optimizers = [torch.optim.Adam(b.parameters(), lr=cfg.optim.lr) for b in blocks]
    start = 0.0
    for step, (x, y) in enumerate(BatchStream(datamodule, cfg.trainer.max_steps)):
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


class BareLoop(LightningModule):
    """The plain loop's work as a minimal manual-optimization LightningModule."""

    def __init__(self, blocks, lr: float, skip: int):
        super().__init__()
        self.blocks, self.lr, self.skip = torch.nn.ModuleList(blocks), lr, skip
        self.automatic_optimization = False
        self.start = self.end = 0.0

    def configure_optimizers(self):
        return [torch.optim.Adam(b.parameters(), lr=self.lr) for b in self.blocks]

    def training_step(self, batch, batch_idx):
        if batch_idx == self.skip:
            self.start = time.perf_counter()
        x, y = batch
        for block in self.blocks:
            x = block(x)
        loss = F.cross_entropy(x, y)
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        for opt in optimizers:
            opt.step()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def time_bare(cfg, datamodule) -> float:
    model = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    bare = BareLoop([c.block for c in model.components], cfg.optim.lr, WARMUP)
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(bare, BatchStream(datamodule, cfg.trainer.max_steps))
    return (bare.end - bare.start) / (cfg.trainer.max_steps - WARMUP)


class BatchStream:
    """`steps` training batches from the datamodule's in-memory loader, epoch after epoch."""

    def __init__(self, datamodule, steps: int):
        self.datamodule, self.steps = datamodule, steps

    def __iter__(self):
        served = 0
        while served < self.steps:
            for batch in self.datamodule.train_dataloader():
                if served == self.steps:
                    return
                served += 1
                yield batch


VARIANTS = ("plain", "bare", "fit", "full")


def time_variant(name: str, cfg, datamodule) -> float:
    if name == "plain":
        return time_plain(cfg, datamodule)
    if name == "bare":
        return time_bare(cfg, datamodule)
    lean = OmegaConf.merge(cfg, {"trainer": {"lean_steps": name == "fit"}})
    return time_fit(lean, datamodule)


def measure(args, k: int, run_root: str) -> dict[str, list[float]]:
    """Per-step seconds of every variant, `reps` times. Each repetition runs all variants back to
    back, in an order reversed every other time, so load drifts hit them alike and ratios are
    taken within a repetition."""
    cfg = make_cfg(args, k, run_root)
    datamodule = create_datamodule(cfg.data, cfg.seed)
    datamodule.setup("fit")
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    warmup = OmegaConf.merge(cfg, {"trainer": {"max_steps": WARMUP + 100}})
    for name in VARIANTS:  # untimed: the first runs in a process pay one-off costs
        time_variant(name, warmup, datamodule)
    for rep in range(args.reps):
        for name in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
            times[name].append(time_variant(name, cfg, datamodule))
    return times


def ratios(times: dict[str, list[float]], num: str, den: str) -> list[float]:
    """The ratio within each repetition, sorted."""
    return sorted(a / b for a, b in zip(times[num], times[den]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--components", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--mnist", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist")
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_root:
        results = {k: measure(args, k, run_root) for k in args.components}
    print(f"\nMLP, MNIST batch {args.batch_size}, {args.reps} interleaved repetitions")
    print("ms/step: medians; ratios: median (and range) of the ratios within each repetition")
    header = ("K", "plain", "bare", "fit", "full", "fit/plain", "range", "fit/bare", "full/plain")
    print("{:>3} {:>7} {:>7} {:>7} {:>7} {:>10} {:>13} {:>9} {:>11}".format(*header))
    for k, times in results.items():
        ms = [1000 * statistics.median(times[name]) for name in VARIANTS]
        fit_plain = ratios(times, "fit", "plain")
        fit_bare = statistics.median(ratios(times, "fit", "bare"))
        full_plain = statistics.median(ratios(times, "full", "plain"))
        spread = f"{fit_plain[0]:.3f}-{fit_plain[-1]:.3f}"
        print(
            f"{k:>3} {ms[0]:>7.3f} {ms[1]:>7.3f} {ms[2]:>7.3f} {ms[3]:>7.3f}"
            f" {statistics.median(fit_plain):>10.3f} {spread:>13} {fit_bare:>9.3f}"
            f" {full_plain:>11.3f}"
        )
    print("target: fit/plain <= 1.10")


if __name__ == "__main__":
    main()
