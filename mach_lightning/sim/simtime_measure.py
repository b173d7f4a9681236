"""What simulated time measures: each component's forward and backward, timed or counted.

A topology describes one step of each component as a `Work` (sim/simtime.py's SimClock picks
when to measure and how to combine). Two cost models:

  timed    torch.utils.benchmark.Timer.blocked_autorange on each forward and each backward, with
           torch pinned to a fixed thread count (restored after) and, on one CPU thread, that
           thread's CPU time as the clock; in each of `rounds` rounds every component in turn
           runs an untimed warm-up call, then a timed block (one call, mostly), and the fastest
           round is kept (time_works says why)
  counted  FLOPs of the forward and of the backward from torch.utils.flop_counter.FlopCounterMode
           (matmuls and convolutions; elementwise ops count 0): a function of the model, the
           batch shape and nothing else

Both leave the run untouched: BatchNorm buffers are restored, the RNG is forked, gradients are
taken with autograd.grad (nothing accumulates into .grad, DDP's hooks stay quiet), and parameters
are only read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

from mach_lightning.core.blocks import build_optimizer
from mach_lightning.core.weights import frozen_buffers


@dataclass
class Work:
    """One component's step as its own device would run it."""

    forward: Callable[[], list[torch.Tensor]]  # a fresh forward: the outputs its loss sums
    inputs: list[torch.Tensor]  # what its backward differentiates: parameters (and its input)
    out_bytes: int  # size of the message it sends to the next device (its output, one batch)


def chain_work(components: nn.ModuleList, x: torch.Tensor) -> list[Work]:
    """A backprop chain: component i (with its head, if any) reads component i-1's output."""
    works, h = [], x
    for i, component in enumerate(components):
        inp = h.detach().requires_grad_(i > 0)  # the first component sends no gradient back
        head = getattr(component, "head", None)

        def forward(component=component, inp=inp, head=head) -> list[torch.Tensor]:
            out = component(inp)
            return [out] if head is None else [out, head(out)]

        out = forward()[0]
        inputs = [p for p in component.parameters() if p.requires_grad] + ([inp] if i > 0 else [])
        works.append(Work(forward, inputs, out.numel() * out.element_size()))
        h = out.detach()
    return works


@contextmanager
def pinned_threads(count: int) -> Iterator[int]:
    """torch's intra-op threads fixed at count (0: as they are) while measuring, then restored."""
    before = torch.get_num_threads()
    count = count or before
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(before)


@contextmanager
def side_effect_free(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Extra forwards and backwards that leave no trace in the run (see the module docstring)."""
    cuda = [device] if device.type == "cuda" else []
    with ExitStack() as stack:
        stack.enter_context(frozen_buffers(module))
        stack.enter_context(torch.random.fork_rng(devices=cuda))  # dropout would draw numbers
        stack.enter_context(torch.enable_grad())
        yield


def _loss(outputs: list[torch.Tensor]) -> torch.Tensor:
    return sum(o.sum() for o in outputs)


def _backward(work: Work) -> Callable[[], object] | None:
    """The backward of one fresh forward, repeatable (the graph is kept); None if it has none."""
    loss = _loss(work.forward())
    if not (work.inputs and loss.requires_grad):
        return None
    return lambda: torch.autograd.grad(loss, work.inputs, retain_graph=True, allow_unused=True)


def _clock(device: torch.device, threads: int) -> dict:
    """Timer's clock: on one CPU thread, that thread's CPU time (time the scheduler gives other
    processes does not count); else Timer's default wall-clock, which synchronises CUDA."""
    return {"timer": time.thread_time} if device.type == "cpu" and threads == 1 else {}


# blocked_autorange's min_run_time: as short as it goes, so that a round is one block, of one
# call unless the call is shorter than this; calls that short are seldom interrupted.
ROUND_S = 1e-5


def _round_s(fn: Callable[[], object] | None, clock: dict, threads: int) -> float:
    """One round: seconds per call of fn, right after an untimed warm-up call (0: no work)."""
    if fn is None:
        return 0.0
    fn()  # the warm-up: the component's caches as its own device would hold them
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, **clock)
    return timer.blocked_autorange(min_run_time=ROUND_S).median


def time_works(
    works: list[Work], device: torch.device, rounds: int, threads: int
) -> list[tuple[float, float]]:
    """(forward ms, backward ms) per work: its fastest round.

    Other processes only ever add time: by preemption (which the thread's CPU time leaves out)
    and by evicting this work's caches (which it still counts), both varying with their load.
    The rounds are short and spread over the measurement, all components taking turns, so some
    run undisturbed, as on a device of its own: the fastest is kept. A median over the rounds
    follows the other processes' load instead: on the 2-vCPU development machine at a load of
    5, twelve measurements of a small 3-component MLP spread by 68% with it, 6% with the fastest.
    """
    samples: list[tuple[list[float], list[float]]] = [([], []) for _ in works]
    with pinned_threads(threads) as count:
        clock = _clock(device, count)
        for _ in range(rounds):
            for work, (fwd, bwd) in zip(works, samples):
                fwd.append(_round_s(work.forward, clock, count))
                bwd.append(_round_s(_backward(work), clock, count))
    return [(1e3 * min(f), 1e3 * min(b)) for f, b in samples]


def optimizer_step(params: list[nn.Parameter], optim_cfg) -> Callable[[], object] | None:
    """One step of an optimizer like the run's, over copies of `params` with random gradients
    (its state initialised by a first step), so the run's own weights and state are only read;
    None when nothing trains."""
    copies = [p.detach().clone().requires_grad_() for p in params if p.requires_grad]
    if not copies:
        return None
    for copy in copies:
        copy.grad = torch.randn_like(copy)
    optimizer = build_optimizer(copies, optim_cfg)
    optimizer.step()
    return optimizer.step


def time_optimizer_steps(
    steps: list[list[Callable[[], object] | None]], device: torch.device, rounds: int, threads: int
) -> list[float]:
    """ms per component: the sum over its optimizers of each one's fastest step (see time_works
    for why the fastest)."""
    with pinned_threads(threads) as count:
        clock = _clock(device, count)
        samples = [[[] for _ in fns] for fns in steps]
        for _ in range(rounds):
            for fns, times in zip(steps, samples):
                for fn, seconds in zip(fns, times):
                    seconds.append(_round_s(fn, clock, count))
    return [1e3 * sum(min(s) for s in times) for times in samples]


def count_flops(work: Work) -> tuple[int, int]:
    """(forward FLOPs, backward FLOPs) of one work."""
    with FlopCounterMode(display=False) as counter:
        work.forward()
    forward = counter.get_total_flops()
    # The backward of a forward run outside the counter: a forward inside it carries the
    # counter's module-tracking hooks, which autograd.grad cannot run.
    backward = _backward(work)
    if backward is None:
        return forward, 0
    with FlopCounterMode(display=False) as counter:
        backward()
    return forward, counter.get_total_flops()
