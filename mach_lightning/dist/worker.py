"""A component process of a `runtime.name=dist` run: its own nodes, loop, optimizers and metrics.

Started by the coordinator (dist/coordinator.py) as
    python -m mach_lightning.dist.worker --run-dir DIR --rank R --world N --store HOST:PORT \
        --parent PID
It builds the whole model exactly as the simulator does (same seed, same initial weights, same
data order), keeps the nodes `rule.process_of` gives it, links to the processes its nodes talk to
and trains in lockstep (dist/lockstep.py) or free mode (dist/free.py). It writes under
DIR/components/c<R>/: metrics.csv (its own metrics, every log point), weights.pt (its components'
weights, at the end), epochs/e<n>.pt (the same at each validation epoch's end), log.txt (what it
printed) and, if it fails, error.json (what went wrong, and which peer if a peer did).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import seed_everything
from omegaconf import OmegaConf

from mach_lightning.atomic import atomic_write_text
from mach_lightning.data import create_datamodule
from mach_lightning.dist import checkpoint
from mach_lightning.dist.free import FreeProcess
from mach_lightning.dist.lockstep import LockstepProcess
from mach_lightning.dist.transport import Link, PeerError
from mach_lightning.runs import RunCSVLogger
from mach_lightning.sim import create_topology
from mach_lightning.sim.meter import TrainMeter

EXIT_PEER = 3  # a peer failed or hung (error.json names it)


def component_dir(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "components" / f"c{rank}"


def build(cfg, rank: int, store):
    """The simulator's module (same init), this process's nodes, their links, the optimizers."""
    seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = create_datamodule(cfg.data, cfg.seed)
    datamodule.prepare_data()
    module = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    datamodule.setup("fit")
    rule, timeout = module.rule, float(cfg.runtime.timeout_s)
    mine = {n.index for n in rule.nodes() if rule.process_of(n.index) == rank}
    peers = {
        rule.process_of(other)
        for s, r in rule.links()
        for node, other in ((s, r), (r, s))
        if node in mine and rule.process_of(other) != rank
    }
    links = {p: Link(store, rank, p, timeout) for p in sorted(peers)}  # sorted: no deadlock
    optimizers, schedulers = module.configure_optimizers()
    if cfg.runtime.mode == "free":
        steps = total_steps(cfg, len(datamodule.train_dataloader()))
        process = FreeProcess(rule, rank, links, int(cfg.runtime.queue), steps - 1)
    else:
        process = LockstepProcess(rule, rank, links)
    return module, datamodule, process, optimizers, schedulers


def total_steps(cfg, loader_batches: int) -> int:
    """The batch steps a run trains: every process counts the same."""
    per_epoch = batches_per_epoch(loader_batches, cfg.trainer.limit_train_batches)
    max_steps, max_epochs = int(cfg.trainer.max_steps), int(cfg.trainer.max_epochs)
    by_epochs = per_epoch * max_epochs if max_epochs > 0 else max_steps
    return min(by_epochs, max_steps) if max_steps > 0 else by_epochs


def own_state(module, process: LockstepProcess) -> dict[str, torch.Tensor]:
    """The entries of the module's state_dict that this process's nodes train."""
    owned = {
        id(t)
        for node in process.mine
        for m in node.modules.values()
        for t in m.state_dict(keep_vars=True).values()
    }
    full = module.state_dict(keep_vars=True)
    return {k: v.detach().clone() for k, v in full.items() if id(v) in owned}


@dataclass
class TrainingParts:
    """What a component process trains with, and what its checkpoints hold (dist/checkpoint.py)."""

    module: object
    process: LockstepProcess
    optimizers: list
    schedulers: list
    meter: TrainMeter
    logger: RunCSVLogger

    def own_state(self) -> dict[str, torch.Tensor]:
        return own_state(self.module, self.process)

    def own_optimizers(self) -> list[int]:
        return [j for node in self.process.mine for j in node.optimizers]


def train(cfg, rank: int, store, out_dir: Path, resume_step: int | None = None) -> int:
    """Every batch step of this process's nodes (from a checkpoint's step, if given); returns
    the number of steps trained."""
    module, datamodule, process, optimizers, schedulers = build(cfg, rank, store)
    loader = datamodule.train_dataloader()
    parts = TrainingParts(
        module, process, optimizers, schedulers, TrainMeter(), RunCSVLogger(out_dir)
    )
    position = {"epoch": 0, "batch": 0, "elapsed_s": 0.0}
    if resume_step is not None:
        position = checkpoint.load(out_dir, resume_step, parts)
        loader.load_state_dict(position["loader"])
    t = resume_step or 0
    meet(store, rank, sorted(process.peers), "started", float(cfg.runtime.timeout_s))
    t = run_epochs(cfg, rank, store, out_dir, parts, loader, t, position)
    process.finish(t - 1)
    parts.logger.log_metrics(process.staleness.histogram_metrics(), step=t)
    parts.logger.save()
    torch.save({"step": t, "state": parts.own_state()}, out_dir / "weights.pt")
    meet(store, rank, sorted(process.peers), "finished", float(cfg.runtime.timeout_s))
    return t


def meet(store, rank: int, peers: list[int], point: str, timeout_s: float) -> None:
    """Go on only once every peer has reached `point` too. "started": the first step (else a
    process that came up first takes free-mode steps its peers are not there for, and the run's
    timing is its start-up's); "finished": the exit (a process that exits closes its links, and
    a peer still reading its last bundles would see a crash that was none)."""
    store.set(f"{point}/{rank}", "1")
    for peer in peers:
        try:
            store.wait([f"{point}/{peer}"], timedelta(seconds=timeout_s))
        except RuntimeError as err:  # c10d's DistStoreError: the wait timed out
            raise PeerError(peer, f"was not {point} within {timeout_s:g} s of this one", err) from None


def run_epochs(cfg, rank, store, out_dir, parts, loader, t: int, position: dict) -> int:
    """The epochs from `position` on; checkpoints every run.checkpoint_every_n_steps steps and at
    each epoch's end. Returns the step count reached."""
    per_epoch = batches_per_epoch(len(loader), cfg.trainer.limit_train_batches)
    log_every = max(1, min(int(cfg.trainer.log_every_n_steps), per_epoch))
    every = int(cfg.run.checkpoint_every_n_steps)
    max_steps, max_epochs = int(cfg.trainer.max_steps), int(cfg.trainer.max_epochs)
    process, meter, clock = parts.process, parts.meter, StepClock(parts.process)
    free = cfg.runtime.mode == "free"
    schedule = FreeSchedule(parts.module.rule) if free else parts.module.schedule
    sleep_s = dict(enumerate(float(ms) / 1000 for ms in cfg.runtime.sleep_ms)).get(rank, 0.0)
    started, done = time.monotonic() - position["elapsed_s"], False

    def save(epoch: int, batch: int, loader_state: dict) -> None:
        process.quiesce()
        elapsed = time.monotonic() - started
        where = {"epoch": epoch, "batch": batch, "elapsed_s": elapsed, "loader": loader_state}
        checkpoint.save(out_dir, t, where, parts)

    for epoch in range(position["epoch"], max_epochs if max_epochs > 0 else 2**62):
        first = position["batch"] if epoch == position["epoch"] else 0
        for b, (x, y) in enumerate(loader, start=first):
            if b >= per_epoch:
                break
            clock.start()
            if sleep_s:  # a straggler on purpose (runtime.sleep_ms)
                time.sleep(sleep_s)
            outs = train_step(schedule, process, parts.optimizers, x, y, t)
            meter_update(meter, outs, y, clock.stop())
            t += 1
            if t % log_every == 0:
                parts.logger.log_metrics(step_metrics(process, meter, clock, rank), step=t)
                meter.reset()
                store.set(f"progress/{rank}", str(t))  # the coordinator's progress line
            done = 0 < max_steps <= t
            if done:
                break
            if every > 0 and t % every == 0 and b + 1 < per_epoch:  # else the epoch's end saves
                save(epoch, b + 1, loader.state_dict())
        for scheduler in parts.schedulers:  # once an epoch, as the simulator's
            scheduler.step()
        if (epoch + 1) % int(cfg.trainer.check_val_every_n_epoch) == 0:
            save_epoch(out_dir, epoch, t, time.monotonic() - started, parts.own_state())
        if done:
            break
        save(epoch + 1, 0, {"epoch": epoch + 1, "batches_done": 0})
    return t


def save_epoch(out_dir: Path, epoch: int, step: int, elapsed_s: float, state: dict) -> None:
    """This process's weights at an epoch's end: the coordinator validates the merged model of
    every such epoch after the run (val/* per epoch, against the wall time it was reached at)."""
    (out_dir / "epochs").mkdir(exist_ok=True)
    record = {"epoch": epoch, "step": step, "elapsed_s": elapsed_s, "state": state}
    torch.save(record, out_dir / "epochs" / f"e{epoch}.pt")


def train_step(schedule, process: LockstepProcess, optimizers, x, y, t: int) -> dict:
    """Batch step t of this process's nodes; each that applied something steps its optimizers."""
    for node in process.mine:
        for j in node.optimizers:
            optimizers[j].zero_grad(set_to_none=True)
    outs = process.step(x, y, t, schedule.delays(t), schedule.active(t))
    step_optimizers(process.mine, outs, optimizers)
    process.end_step()
    return outs


class FreeSchedule:
    """Free mode's delays: the rule's own (which links wait), every component active."""

    def __init__(self, rule):
        self.fixed, self.all = rule.free_delays(), [True] * rule.num_components

    def delays(self, step: int) -> list[int]:
        return self.fixed

    def active(self, step: int) -> list[bool]:
        return self.all


def step_optimizers(nodes, outs: dict, optimizers) -> None:
    """Each node that applied something steps its own optimizers (after its hooks: DC-ASGD)."""
    for node in nodes:
        out = outs[node.index]
        if out.updates:
            own = [optimizers[j] for j in node.optimizers]
            for hook in out.before_step:
                hook(own)
            for optimizer in own:
                optimizer.step()


def meter_update(meter: TrainMeter, outs: dict, y, elapsed: float) -> None:
    """train/loss and train/acc, in the process whose node gives the model's logits."""
    main = next((o for o in outs.values() if o.logits is not None), None)
    if main is not None:
        meter.update(main.logged_loss(y), main.logits, y, elapsed)


def batches_per_epoch(n: int, limit: float) -> int:
    """Lightning's reading of trainer.limit_train_batches: a fraction (<= 1.0) or a count."""
    return min(n, int(limit)) if limit > 1 else max(1, int(n * limit))


class StepClock:
    """Wall time per step, and the share of it spent waiting on the links."""

    def __init__(self, process: LockstepProcess):
        self.process, self.steps, self.seconds, self._t0 = process, 0, 0.0, 0.0
        self._wait0 = self.waited()

    def waited(self) -> float:
        return sum(link.stats.wait_s for link in self.process.peers.values())

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        elapsed = time.perf_counter() - self._t0
        self.steps, self.seconds = self.steps + 1, self.seconds + elapsed
        return elapsed

    def window(self, rank: int) -> dict[str, float]:
        """Metrics since the last call: real step time, waiting share, traffic per link."""
        waited = self.waited() - self._wait0
        out = {
            f"time/real_step_ms_c{rank}": 1000.0 * self.seconds / max(self.steps, 1),
            f"time/wait_frac_c{rank}": waited / max(self.seconds, 1e-9),
        }
        for peer, link in self.process.peers.items():
            seconds = max(self.seconds, 1e-9)
            out[f"link/msgs_per_s_c{rank}-c{peer}"] = link.stats.messages / seconds
            out[f"link/mb_per_s_c{rank}-c{peer}"] = link.stats.bytes / 2**20 / seconds
            link.stats.messages = link.stats.bytes = 0
        self.steps, self.seconds, self._wait0 = 0, 0.0, self.waited()
        return out


def step_metrics(process, meter, clock, rank: int) -> dict[str, float]:
    metrics = clock.window(rank)
    metrics.update(process.window_metrics())
    if meter.steps:
        metrics.update(meter.summary())
    for node in process.mine:
        metrics.update(node.meter.summary())
    return metrics


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--store", required=True, help="HOST:PORT of the coordinator's store")
    parser.add_argument("--parent", type=int, default=0, help="the coordinator's pid")
    parser.add_argument("--resume-step", type=int, default=None, help="continue from this step")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mach_lightning.methods  # noqa: F401  (the registry of rules)

    if args.parent:
        end_with_parent(args.parent)
    out_dir = component_dir(args.run_dir, args.rank)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.load(args.run_dir / "config.yaml")
    # the processes share the machine's cores (lockstep keeps few of them busy at once)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
    (out_dir / "pid").write_text(f"{os.getpid()}\n")
    host, port = args.store.rsplit(":", 1)
    timeout = timedelta(seconds=float(cfg.runtime.timeout_s))
    try:
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
        steps = train(cfg, args.rank, store, out_dir, args.resume_step)
    except PeerError as err:
        write_error(out_dir, str(err), peer=err.peer)
        return EXIT_PEER
    except Exception as err:  # noqa: BLE001  (recorded for the coordinator, then re-raised)
        write_error(out_dir, f"{type(err).__name__}: {err}", trace=traceback.format_exc())
        raise
    print(f"component process {args.rank}: {steps} steps", flush=True)
    return 0


def end_with_parent(parent: int) -> None:
    """Die with the coordinator, even one killed by SIGKILL (which can stop nobody): Linux
    sends this process SIGTERM when its parent exits. Elsewhere the coordinator's own clean-up
    (dist/coordinator.py: _stop) is all there is."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1  # noqa: N806  (<linux/prctl.h>)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above took effect
        sys.exit(f"component process: the coordinator (pid {parent}) is gone")


def write_error(out_dir: Path, message: str, **fields) -> None:
    atomic_write_text(out_dir / "error.json", json.dumps({"message": message, **fields}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
