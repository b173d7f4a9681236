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

--internals times `fit` instead against `fit` with each switch of mach_lightning/internals.py
turned off (the public API in place of a private Lightning internal), side by side the same way:
what each switch buys. On a loaded machine, `--threads 1 --clock cpu` (this process's CPU time)
keeps other jobs out of the figures.

    python bench/overhead.py [--steps 500] [--reps 7] [--components 1 2 4] [--batch-size 128]
                             [--mnist DIR] [--internals] [--threads N] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import types
from pathlib import Path

import step_clock
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from omegaconf import OmegaConf
from step_clock import WARMUP, StepClock, timed_run_overrides

from mach_lightning import internals
from mach_lightning.config import load_config
from mach_lightning.data import create_datamodule
from mach_lightning.fit import build_trainer
from mach_lightning.sim import create_topology

CLOCK = {"now": time.perf_counter}  # --clock cpu: time.process_time


def now() -> float:
    return CLOCK["now"]()


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
            start = now()
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
    return (now() - start) / (cfg.trainer.max_steps - WARMUP)


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
            self.start = now()
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
        self.end = now()


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
OFF = "no-"  # --internals: "no-<switch>" is fit with that switch of internals.py off
INTERNAL_VARIANTS = ("fit", *(OFF + name for name in internals.SWITCHES))


def time_variant(name: str, cfg, datamodule) -> float:
    if name == "plain":
        return time_plain(cfg, datamodule)
    if name == "bare":
        return time_bare(cfg, datamodule)
    if name.startswith(OFF):  # the code reads each switch where it acts, so flipping it works
        switch = name.removeprefix(OFF).upper()
        setattr(internals, switch, False)
        try:
            return time_fit(cfg, datamodule)
        finally:
            setattr(internals, switch, True)
    lean = OmegaConf.merge(cfg, {"trainer": {"lean_steps": name != "full"}})
    return time_fit(lean, datamodule)


def measure(args, k: int, run_root: str, variants: tuple) -> dict[str, list[float]]:
    """Per-step seconds of every variant, `reps` times. Each repetition runs all variants back to
    back, in an order reversed every other time, so load drifts hit them alike and ratios are
    taken within a repetition."""
    cfg = make_cfg(args, k, run_root)
    if args.internals:  # simulated time measured once, before the warm-up: each re-timing (some
        # 0.4 s within the timed steps) would swamp the few percent a switch buys
        cfg = OmegaConf.merge(cfg, {"simtime": {"remeasure_every_n_steps": 0}})
    datamodule = create_datamodule(cfg.data, cfg.seed)
    datamodule.setup("fit")
    times: dict[str, list[float]] = {name: [] for name in variants}
    warmup = OmegaConf.merge(cfg, {"trainer": {"max_steps": WARMUP + 100}})
    for name in variants:  # untimed: the first runs in a process pay one-off costs
        time_variant(name, warmup, datamodule)
    for rep in range(args.reps):
        for name in variants if rep % 2 == 0 else variants[::-1]:
            times[name].append(time_variant(name, cfg, datamodule))
    return times


def ratios(times: dict[str, list[float]], num: str, den: str) -> list[float]:
    """The ratio within each repetition, sorted."""
    return sorted(a / b for a, b in zip(times[num], times[den]))


def print_overhead(results: dict) -> None:
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


def print_internals(results: dict) -> None:
    """Per switch: fit with it off, against fit with every switch on (what the switch buys)."""
    print(f"{'K':>3} {'variant':>20} {'ms/step':>8} {'/fit':>7} {'range':>13}")
    for k, times in results.items():
        for name in INTERNAL_VARIANTS:
            ms = 1000 * statistics.median(times[name])
            within = ratios(times, name, "fit")
            spread = f"{within[0]:.3f}-{within[-1]:.3f}"
            print(f"{k:>3} {name:>20} {ms:>8.3f} {statistics.median(within):>7.3f} {spread:>13}")
    print("keep a switch only where /fit >= 1.02 (internals.py)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--components", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--mnist", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist")
    )
    parser.add_argument("--internals", action="store_true", help="what each switch buys")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":  # this process's CPU time, for every variant's clock
        CLOCK["now"] = time.process_time
        step_clock.time = types.SimpleNamespace(perf_counter=now)  # StepClock's time.perf_counter
    variants = INTERNAL_VARIANTS if args.internals else VARIANTS
    with tempfile.TemporaryDirectory() as run_root:
        results = {k: measure(args, k, run_root, variants) for k in args.components}
    threads, clock = torch.get_num_threads(), args.clock
    print(f"\nMLP, MNIST batch {args.batch_size}, {args.reps} interleaved repetitions")
    print(f"ms/step ({clock} clock, {threads} torch threads): medians; ratios: median (and range)")
    print("of the ratios within each repetition")
    (print_internals if args.internals else print_overhead)(results)


if __name__ == "__main__":
    main()
