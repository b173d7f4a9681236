"""Transport overhead of the dist runtime: its bundles against raw gloo send/recv, same run.

Two processes on this machine, one 2-rank gloo group between them built as the runtime builds
its links (dist/transport.py). Each repetition runs both variants back to back (order reversed
every other repetition) for N round trips of a float32 tensor (default 128x512, the size of the
notes' measurements), A -> B and a same-shape answer back:

  raw     group.send / group.recv of the tensor itself
  bundle  Link.send_bundle / recv_bundle of one ACTIVATION message carrying it (header: kind,
          batch, sender, step, version, send time, shapes), answered by one GRADIENT message
The ratio bundle/raw (median over repetitions of per-repetition ratios) is the runtime's
per-message overhead. Target: <= 1.5.

    python bench/dist_transport.py [--trips 500] [--reps 5] [--rows 128] [--cols 512]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from mach_lightning.core.messages import ACTIVATION, GRADIENT, Message
from mach_lightning.dist import wire
from mach_lightning.dist.transport import Link


def raw_trips(link: Link, tensor: torch.Tensor, trips: int, first: bool) -> float:
    buffer = torch.empty_like(tensor)
    start = time.perf_counter()
    for _ in range(trips):
        if first:
            link.group.send([tensor], link.peer_rank, 0).wait()
            link.group.recv([buffer], link.peer_rank, 0).wait()
        else:
            link.group.recv([buffer], link.peer_rank, 0).wait()
            link.group.send([buffer], link.peer_rank, 0).wait()
    return (time.perf_counter() - start) / trips


def bundle_trips(link: Link, tensor: torch.Tensor, trips: int, first: bool) -> float:
    start = time.perf_counter()
    for step in range(trips):
        if first:
            _send(link, Message(ACTIVATION, step, 0, 1, tensor, step), tag=2)
            _recv(link, tag=3)
        else:
            m = _recv(link, tag=2)
            _send(link, Message(GRADIENT, m.batch, 1, 0, m.tensor, step), tag=3)
    return (time.perf_counter() - start) / trips


def _send(link: Link, message: Message, tag: int) -> None:
    headers, tensors = wire.encode([(message, message.step)])
    link.send_bundle(tag, {"messages": headers}, tensors)
    link.flush()


def _recv(link: Link, tag: int) -> Message:
    header, tensors = link.recv_bundle(tag)
    return wire.decode(header["messages"], tensors)[0][0]


def worker(args, rank: int) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", args.port, is_master=False, timeout=timedelta(seconds=60))
    link = Link(store, rank, 1 - rank, timeout_s=60)
    tensor = torch.randn(args.rows, args.cols)
    first = rank == 0
    raw_trips(link, tensor, 50, first)  # warm-up
    bundle_trips(link, tensor, 50, first)
    results = []
    for rep in range(args.reps):
        order = ("raw", "bundle") if rep % 2 == 0 else ("bundle", "raw")
        times = {}
        for name in order:
            run = raw_trips if name == "raw" else bundle_trips
            times[name] = run(link, tensor, args.trips, first)
        results.append(times)
    if first:
        report(args, results)


def report(args, results: list[dict]) -> None:
    raw = statistics.median(r["raw"] for r in results) * 1e3
    bundle = statistics.median(r["bundle"] for r in results) * 1e3
    ratios = [r["bundle"] / r["raw"] for r in results]
    print(f"float32 {args.rows}x{args.cols}, {args.trips} round trips x {args.reps} repetitions")
    print("  raw ms/trip  bundle ms/trip  bundle/raw  range")
    print(
        f"  {raw:11.3f}  {bundle:14.3f}  {statistics.median(ratios):10.3f}  "
        f"{min(ratios):.3f}-{max(ratios):.3f}"
    )
    print("target: bundle/raw <= 1.5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, default=500)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        worker(args, args.rank)
        return
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    argv = [a for a in sys.argv[1:]]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *argv, "--rank", str(r), "--port", str(store.port)]
        )
        for r in range(2)
    ]
    codes = [p.wait(timeout=1800) for p in procs]
    if any(codes):
        sys.exit(f"a benchmark process failed: exit codes {codes}")


if __name__ == "__main__":
    main()
