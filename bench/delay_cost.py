"""Cost of staleness: `delayed` (constant k=4) against `sync`, and in-flight memory against k.

1. Time. Both topologies train the same MLP split into K=4 components on the same MNIST batches
   through `fit` (the real Trainer loop). Repetitions are interleaved (sync, delayed, sync, ...)
   because this machine is shared and noisy; the median per-step time of each is compared after a
   warm-up. Target: delayed / sync <= 1.15. The cosine probe is off in both (it is a diagnostic
   that costs an extra forward/backward every N steps); simulated time is on in both.
2. Memory. For k = 0, 2, 4, 8 the bytes held in flight after training (the queues: stored inputs,
   weight copies, gradient messages, and the activations saved by stored graphs, each storage
   counted once; `Delayed.inflight_bytes()`). That is what grows with the delay; the rest of the
   process (model, optimizer state, one batch's forward) does not change with k. This is a count
   of live bytes held by the engine, not an allocator peak (CPU torch keeps no peak statistics).

    python bench/delay_cost.py [--steps 200] [--reps 3] [--mode stash|recompute]
                               [--dataset mnist] [--mnist ../shared/data/mnist]
                               [--batch-size 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from step_clock import WARMUP, StepClock, timed_run_overrides

from mach_lightning.config import load_config
from mach_lightning.data import create_datamodule
from mach_lightning.fit import build_trainer
from mach_lightning.sim import create_topology


def make_cfg(args, run_root: str, *overrides: str):
    data = [f"data.name={args.dataset}", f"data.batch_size={args.batch_size}"]
    if args.dataset == "mnist":
        data.append(f"data.root={args.mnist}")
    return load_config(
        None,
        [
            *data,
            "model.num_components=4",
            *timed_run_overrides(args.steps, run_root),
            "trainer.progress_bar=false",
            "diagnostics.cosine_every_n_steps=0",
            f"delayed.grad_mode={args.mode}",
            *overrides,
        ],
    )


def train(cfg, datamodule):
    """Train cfg for trainer.max_steps; the model and the per-step seconds after warm-up."""
    model = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    trainer = build_trainer(cfg, Path(cfg.run.root) / "bench")
    clock = StepClock(model)
    trainer.fit(model, datamodule=datamodule)
    return model, (clock.end - clock.start) / (cfg.trainer.max_steps - WARMUP)


def time_side_by_side(args, run_root: str, datamodule) -> tuple[float, float]:
    sync_cfg = make_cfg(args, run_root, "topology.name=sync")
    delayed_cfg = make_cfg(
        args, run_root, "topology.name=delayed", "staleness.schedule=constant", "staleness.k=4"
    )
    sync, delayed = [], []
    for _ in range(args.reps):  # interleaved, so drifts in machine load hit both
        sync.append(train(sync_cfg, datamodule)[1])
        delayed.append(train(delayed_cfg, datamodule)[1])
    return statistics.median(sync), statistics.median(delayed)


def memory_by_delay(args, run_root: str, datamodule) -> list[tuple[int, int]]:
    rows = []
    for k in (0, 2, 4, 8):
        cfg = make_cfg(
            args,
            run_root,
            "topology.name=delayed",
            "staleness.schedule=constant",
            f"staleness.k={k}",
            f"trainer.max_steps={WARMUP + 10}",
        )
        model, _ = train(cfg, datamodule)
        rows.append((k, model.inflight_bytes()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mode", default="stash", choices=["stash", "recompute"])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--mnist", default=str(Path(__file__).resolve().parents[2] / "shared/data/mnist")
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_root:
        data_cfg = make_cfg(args, run_root).data
        datamodule = create_datamodule(data_cfg, 0)
        sync_s, delayed_s = time_side_by_side(args, run_root, datamodule)
        memory = memory_by_delay(args, run_root, datamodule)
    steps = args.steps - WARMUP
    print(
        f"\nper-step time, MLP K=4, {args.dataset} batch {data_cfg.batch_size}, "
        f"grad_mode={args.mode}, median of {args.reps} interleaved reps x {steps} steps"
    )
    print(f"{'sync ms/step':>14} {'delayed k=4 ms/step':>20} {'ratio':>7}")
    ratio = delayed_s / sync_s
    print(f"{1000 * sync_s:>14.3f} {1000 * delayed_s:>20.3f} {ratio:>7.3f}   (target <= 1.15)")
    print(f"\nin-flight memory, delayed constant k, grad_mode={args.mode}")
    print(f"{'k':>3} {'held MiB':>10} {'MiB per step of delay':>22}")
    for k, held in memory:
        per = f"{held / k / 2**20:>22.3f}" if k else f"{'-':>22}"
        print(f"{k:>3} {held / 2**20:>10.3f} {per}")


if __name__ == "__main__":
    main()
