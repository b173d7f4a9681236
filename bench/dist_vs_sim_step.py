"""Real step time against simulated: K=2 MLP components, one thread per process.

    python bench/dist_vs_sim_step.py [--epochs 1] [--latency-us 10 200] [--set key=value ...]

For `sync` and `delayed`, the same config runs through both runtimes, one after the other:
  sim   one process; each component's forward and backward timed on one thread
        (simtime.measure_threads=1) and composed into time/sim_step_ms, the step the components
        would take each on its own device (sim/simtime.py: a chain for sync, the slowest
        component for delayed, plus messages at simtime.link_latency_us)
  dist  runtime.name=dist, runtime.mode=free: one process per component, one thread each;
        time/real_step_ms_c<i> as measured, the slowest process's per window
Printed: the medians over the logged windows (the first left out: start-up) and real/sim
(target: within 20%), each simulated both ways: forward and backward only (the default), and
with each component's optimizer step timed too (simtime.optimizer_step=true). Each
--latency-us value gives the simulator another link latency, so the
table shows how much of a gap is the link: the default 10 us is an accelerator link; gloo
between two processes here is nearer 200 us one way (../shared/notes: 0.35-0.48 ms a round trip).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_time_to_accuracy import REPO, fit  # noqa: E402  (one way to run a bench's fits)

METHODS = ("sync", "delayed")


def median_step_ms(run_dir: Path, prefix: str) -> float:
    """The median over logged windows (but the first) of the slowest `prefix*` column."""
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    values = []
    for r in rows:
        keys = [k for k in r if k.startswith(prefix) and r[k]]
        if keys:
            values.append(max(float(r[k]) for k in keys))
    if len(values) < 2:
        sys.exit(f"{run_dir}: fewer than two windows of {prefix}*: train longer (--epochs)")
    return statistics.median(values[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-us", type=float, nargs="+", default=[10.0, 200.0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "mnist"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            common = (f"topology.name={method}",)
            if method == "delayed":
                common += ("staleness.schedule=pipeline",)
            print(f"running {method}: dist ...", flush=True)
            real_dir = fit(Path(tmp), f"dist {method}", args,
                           (*common, "runtime.name=dist", "runtime.mode=free"))  # fmt: skip
            real = median_step_ms(real_dir, "time/real_step_ms_c")
            for latency in args.latency_us:
                for optimizer in ("false", "true"):
                    what = f"link latency {latency:g} us, optimizer step timed: {optimizer}"
                    print(f"running {method}: sim, {what} ...", flush=True)
                    sim_extra = (
                        *common,
                        "simtime.enabled=true",
                        "simtime.measure_threads=1",
                        f"simtime.link_latency_us={latency}",
                        f"simtime.optimizer_step={optimizer}",
                    )
                    name = f"sim {method} {latency:g} {optimizer}"
                    sim = median_step_ms(fit(Path(tmp), name, args, sim_extra), "time/sim_step_ms")
                    rows.append((method, latency, optimizer, real, sim))
    print(f"\nMNIST MLP, K=2, {args.epochs} epoch(s), {' '.join(args.set) or 'defaults'}")
    print(
        "| method | sim link latency us | sim times the optimizer step | real step ms (dist) "
        "| sim step ms | real/sim |"
    )
    print("|---|---|---|---|---|---|")
    for method, latency, optimizer, real, sim in rows:
        print(f"| {method} | {latency:g} | {optimizer} | {real:.2f} | {sim:.2f} | "
              f"{real / sim:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
