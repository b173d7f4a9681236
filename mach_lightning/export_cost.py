"""What a model costs: test accuracy, parameters that run, FLOPs per example, latency.

Latency is wall-clock time measured with torch.utils.benchmark.Timer, torch's thread count fixed
for the measurement: warm-up calls (the first ones allocate and fill caches), then blocks of about
BLOCK_S of repeated calls until MIN_RUN_TIME is spent, reported as the median and interquartile
range over the blocks. The blocks are short on purpose: blocked_autorange sizes them to >= 10 ms
(timer overhead under 0.01 %), and on a busy machine nearly every block that long includes time
the process spent descheduled, so its median moved 4x between identical calls in our tests; with
1 ms blocks (overhead ~0.1 %) most blocks run undisturbed and the median stays put, while the IQR
still shows how noisy the machine was.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.benchmark import Timer
from torch.utils.benchmark.utils.common import Measurement
from torch.utils.flop_counter import FlopCounterMode

WARMUP_CALLS = 3
BLOCK_S = 1e-3  # seconds of calls per timed block
MIN_BLOCKS = 5
MIN_RUN_TIME = 0.5  # seconds of timed blocks per latency figure


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


def latency_ms(
    model, x: torch.Tensor, threads: int = 1, min_run_time: float = MIN_RUN_TIME
) -> tuple[float, float]:
    """(median, IQR) in ms of one model(x), measured with `threads` torch threads."""
    timer = Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads)
    with torch.no_grad():  # the timer runs the statement in this thread, under this grad mode
        timer.timeit(WARMUP_CALLS)
        per_call = timer.timeit(WARMUP_CALLS).median
        number = max(1, round(BLOCK_S / per_call))
        blocks: list[Measurement] = []
        spent = 0.0
        while len(blocks) < MIN_BLOCKS or spent < min_run_time:
            blocks.append(timer.timeit(number))
            spent += blocks[-1].raw_times[0]
    measured = Measurement.merge(blocks)[0]  # one time per block, per call
    return 1e3 * measured.median, 1e3 * measured.iqr


def measure(
    model, loader, sample: torch.Tensor, counted: tuple[nn.Module, torch.Tensor], **timing
) -> dict[str, float]:
    """Accuracy and latency of `model` on `loader`/`sample`; parameters and FLOPs of `counted`
    (module, its input): a traced or exported module has no hooks to count with."""
    counted_model, counted_x = counted
    batch1, batch1_iqr = latency_ms(model, sample[:1], **timing)
    full, full_iqr = latency_ms(model, sample, **timing)
    return {
        "batch": len(sample),
        "test_acc": accuracy(model, loader),
        "params": parameters_used(counted_model, counted_x),
        "flops": flops_per_example(counted_model, counted_x),
        "latency_ms_batch1": batch1,
        "latency_iqr_batch1": batch1_iqr,
        "latency_ms_batch": full,
        "latency_iqr_batch": full_iqr,
    }


def format_report(results: dict[str, dict[str, float]], threads: int) -> str:
    """One row per model; latency as median ± IQR in ms."""
    batch = next(iter(results.values()))["batch"]
    lines = [
        f"latency: ms, median ± IQR over torch.utils.benchmark blocks, {threads} thread(s)",
        f"{'':12} {'test acc':>9} {'params':>10} {'MFLOPs/ex':>10} {'batch 1':>17} "
        f"{f'batch {batch}':>19}",
    ]
    for name, r in results.items():
        batch1 = f"{r['latency_ms_batch1']:.3f} ± {r['latency_iqr_batch1']:.3f}"
        full = f"{r['latency_ms_batch']:.3f} ± {r['latency_iqr_batch']:.3f}"
        lines.append(
            f"{name:12} {r['test_acc']:9.4f} {r['params']:10,d} {r['flops'] / 1e6:10.3f} "
            f"{batch1:>17} {full:>19}"
        )
    return "\n".join(lines)
