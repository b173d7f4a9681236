"""Real time-to-accuracy: free-mode dist runs against synchronous backprop in one process.

    python bench/dist_time_to_accuracy.py [--target 0.9] [--epochs 1] [--set model.width=1024]

Runs, one after another on this machine, the same MNIST MLP split in K=2 components:
  sim sync     one process, every thread of the machine (the baseline)
  sim sync, 1 thread   the same with one torch thread: what each dist process has
  dist sync    free mode, one process per component: forward and backward locked across them
  dist delayed free mode: each component applies whatever gradient has arrived (stash)
  dist local   free mode: no gradient crosses a link
  dist mach_seq  free mode: the consumer steps with its student's imitation when the
               producer's embedding is not there yet (the share of such steps: "late inputs")
  sim delayed / local / mach_seq (simulated)   the simulator's prediction of the same runs: one
               process, timed by `time/sim_step_ms` (simulated parallel time, one device per
               component), so real and simulated time-to-accuracy sit side by side
Each dist process gets cpu_count // 2 threads, so every run has the machine's threads in all.
Training time is the sum of the measured step times (time/step_ms, time/real_step_ms_c<i> of
the process holding the logits; time/sim_step_ms for the simulated runs), so start-up and
evaluation are left out of every run alike.
Printed per run: steps/s, training seconds, the time at which the windowed training accuracy
first reached --target, its ratio to sim sync's, the final val/acc, each process's waiting share,
the mean staleness measured, and the share of steps a MACH consumer took without its input.
Ratios are measured side by side in one run of this script.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUNS = {
    "sim sync": ("topology.name=sync",),
    "sim sync, 1 thread": ("topology.name=sync",),  # what one process per core starts from
    "dist sync": ("topology.name=sync", "runtime.name=dist", "runtime.mode=free"),
    "dist delayed": ("topology.name=delayed", "runtime.name=dist", "runtime.mode=free"),
    "dist local": ("topology.name=local", "runtime.name=dist", "runtime.mode=free"),
    "dist mach_seq": ("topology.name=mach_seq", "runtime.name=dist", "runtime.mode=free"),
    "sim delayed (simulated)": ("topology.name=delayed", "simtime.enabled=true"),
    "sim local (simulated)": ("topology.name=local", "simtime.enabled=true"),
    "sim mach_seq (simulated)": ("topology.name=mach_seq", "simtime.enabled=true"),
}


def fit(root: Path, name: str, args, extra: tuple) -> Path:
    run_id = name.replace(" ", "_").replace(",", "")
    overrides = [
        f"run.root={root}",
        f"run.id={run_id}",
        "logger.wandb.enabled=false",
        "trainer.progress_bar=false",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.test_after_fit=false",
        f"trainer.max_epochs={args.epochs}",
        "trainer.log_every_n_steps=10",
        "data.name=mnist",
        f"data.root={args.data_root}",
        "data.download=false",
        "model.num_components=2",
        "simtime.enabled=false",
        "diagnostics.cosine_every_n_steps=0",
        f"seed={args.seed}",
        *args.set,
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if "1 thread" in name else None
    proc = subprocess.run(
        [sys.executable, "-m", "mach_lightning.fit", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        sys.exit(f"{name}: fit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return root / "default" / run_id


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(training seconds so far, windowed train/acc) at every logged training row."""
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = [r for r in csv.DictReader(file) if r.get("train/acc")]
    points, seconds, last_step = [], 0.0, 0
    for r in rows:
        step = int(float(r["step"]))
        keys = [k for k in r if k.startswith("time/real_step_ms_c") and r[k]]
        if r.get("time/sim_step_ms"):  # a simulated run: its modelled parallel step
            step_ms = float(r["time/sim_step_ms"])
        elif keys:
            step_ms = max(float(r[k]) for k in keys)
        else:
            step_ms = float(r["time/step_ms"])
        seconds += step_ms / 1000 * (step - last_step)
        last_step = step
        points.append((seconds, float(r["train/acc"])))
    return points


def val_curve(run_dir: Path, points: list) -> list[tuple[float, float]]:
    """(training seconds, val/acc) at every epoch's validation; seconds at the nearest logged
    training row at or before the epoch's step."""
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    steps = [int(float(r["step"])) for r in rows if r.get("train/acc")]
    out = []
    for r in rows:
        if r.get("val/acc"):
            step = int(float(r["step"]))
            at = max((i for i, s in enumerate(steps) if s <= step), default=None)
            out.append((points[at][0] if at is not None else 0.0, float(r["val/acc"])))
    return sorted(out)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, r in results.items():
        xs, ys = zip(*r["val_curve"]) if r["val_curve"] else ((), ())
        ax.plot(
            xs,
            ys,
            marker="o",
            linestyle=":" if "simulated" in name else "--" if name.startswith("sim") else "-",
            label=name,
        )
    ax.set_xlabel("training wall time (s): the sum of measured step times")
    ax.set_ylabel("val/acc (each epoch's end)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure: {path}")


def summary(run_dir: Path, target: float) -> dict:
    points = curve(run_dir)
    result = json.loads((run_dir / "result.json").read_text())
    reached = next((s for s, acc in points if acc >= target), None)
    waits = [f"{result[k]:.2f}" for k in sorted(result) if k.startswith("time/wait_frac_c")]
    stale = [f"{result[k]:.1f}" for k in sorted(result) if k.startswith("diag/staleness_c")]
    late = [f"{result[k]:.2f}" for k in sorted(result) if k.startswith("diag/late_input_frac_c")]
    return {
        "seconds": points[-1][0],
        "steps_per_s": result["step"] / points[-1][0],
        "reached_s": reached,
        "val_acc": result.get("val/acc", float("nan")),
        "wait": "/".join(waits) or "-",
        "staleness": "/".join(stale) or "-",
        "late": "/".join(late) or "-",
        "val_curve": val_curve(run_dir, points),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.9, help="windowed train/acc to reach")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, help="write val/acc against wall time here (PNG)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run, e.g. --set model.width=1024",
    )
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "mnist"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, extra in RUNS.items():
            print(f"running {name} ...", flush=True)
            results[name] = summary(fit(Path(tmp), name, args, extra), args.target)
    base = results["sim sync"]
    title = f"MNIST MLP, K=2, {args.epochs} epoch(s), {' '.join(args.set) or 'defaults'}"
    print(f"\n{title}; target train/acc {args.target}")
    print(
        "| run | steps/s | train s | to target s | speed-up to target | val/acc | wait share"
        " | staleness | late inputs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        reached = f"{r['reached_s']:.2f}" if r["reached_s"] is not None else "not reached"
        ratio = (
            f"{base['reached_s'] / r['reached_s']:.2f}x"
            if r["reached_s"] and base["reached_s"] else "-"
        )  # fmt: skip
        print(f"| {name} | {r['steps_per_s']:.0f} | {r['seconds']:.2f} | {reached} | {ratio} | "
              f"{r['val_acc']:.4f} | {r['wait']} | {r['staleness']} | {r['late']} |")  # fmt: skip

    if args.plot:
        plot(results, args.plot, title)


if __name__ == "__main__":
    main()
