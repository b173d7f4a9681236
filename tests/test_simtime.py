"""Simulated parallel time: cost models, re-measurement, checkpointed state (no Trainer)."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import mach_lightning.sim.simtime as simtime
from mach_lightning.config import Config, ConfigError, load_config
from mach_lightning.sim.simtime import SimClock, SimLayout
from mach_lightning.sim.simtime_measure import chain_work, count_flops

WIDTH, BATCH = 64, 32


def make_clock(**sim) -> SimClock:
    cfg = OmegaConf.structured(Config).simtime
    for key, value in sim.items():
        cfg[key] = value
    return SimClock(cfg, slowdowns=[1.0, 1.0, 1.0])


def tiny_model() -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(
        [
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Dropout(0.1)),
            nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH)),
            nn.Linear(WIDTH, 4),
        ]
    )


def simulate(steps: int, runs: int = 1, **sim) -> list[SimClock]:
    """Runs' clocks as TopologyModule drives them: measure when due, then tick, every batch step.
    Several runs advance in lockstep, so that each measures the machine in the same moments."""
    clocks, models = [make_clock(**sim) for _ in range(runs)], [tiny_model() for _ in range(runs)]
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        for clock, model in zip(clocks, models):
            if clock.due(step):
                clock.measure(model, x, step)
            clock.tick(SimLayout(parallel=True))
    return clocks


def test_flops_of_linear_layers_forward_and_backward():
    n_in, n_out, batch = 8, 3, 5
    model = nn.ModuleList([nn.Linear(n_in, n_in), nn.Linear(n_in, n_out)])
    works = chain_work(model, torch.randn(batch, n_in))
    forward = 2 * n_in * n_out * batch
    # The second component's backward: the gradient of its weight and of its input, 2 matmuls.
    assert count_flops(works[1]) == (forward, 2 * forward)
    # The first sends no gradient back: its backward is the weight gradient alone.
    assert count_flops(works[0]) == (2 * n_in * n_in * batch, 2 * n_in * n_in * batch)
    clock = make_clock(cost="flops", flops_per_s=1e9)
    clock.measure(model, torch.randn(batch, n_in))
    assert clock.fwd_ms[1] == pytest.approx(forward / 1e9 * 1e3)
    assert clock.bwd_ms[1] == pytest.approx(2 * forward / 1e9 * 1e3)


def test_flops_cost_gives_identical_simulated_time_in_two_runs():
    first, second = simulate(6, runs=2, cost="flops", remeasure_every_n_steps=2)
    assert first.metrics() == second.metrics()
    assert first.elapsed_ms == second.elapsed_ms > 0
    assert len(first.samples) == 1  # counted FLOPs do not change: counted once


def test_measured_cost_is_the_median_of_every_measurement_so_far():
    # Measured as a run measures: on the first batch, at steps 4 and 16, then every N steps;
    # the estimate in use is the per-component median of all of them, so one measurement spoilt
    # by a busy machine is outvoted. (How closely two runs agree is a property of the machine,
    # not of this code: timed comparisons belong in bench/, not in a unit test.)
    (clock,) = simulate(200, remeasure_every_n_steps=50)
    assert len(clock.samples) == 6  # steps 0, 4, 16, 50, 100, 150
    assert clock.measured_at == 150
    for i in range(3):
        fwd = sorted(sample[0][i] for sample in clock.samples)
        bwd = sorted(sample[1][i] for sample in clock.samples)
        assert clock.fwd_ms[i] == pytest.approx(statistics.median(fwd))
        assert clock.bwd_ms[i] == pytest.approx(statistics.median(bwd))
    assert clock.elapsed_ms > 0


@pytest.mark.parametrize("cost", ["measured", "flops"])
def test_measurement_leaves_no_trace(cost):
    model = tiny_model()
    x = torch.randn(BATCH, WIDTH)
    model[2].weight.grad = torch.ones_like(model[2].weight)  # a gradient already accumulated
    state = copy.deepcopy(model.state_dict())  # parameters and BatchNorm's buffers
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    clock = make_clock(cost=cost, measure_reps=2, measure_threads=1)
    clock.measure(model, x)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model[2].weight.grad, torch.ones_like(model[2].weight))
    assert all(p.grad is None for p in model[:2].parameters())
    assert torch.equal(rng, torch.get_rng_state())  # the dropout drew from a forked generator
    assert torch.get_num_threads() == threads
    assert min(clock.fwd_ms) > 0 and min(clock.bwd_ms) > 0
    assert clock.out_bytes == [BATCH * WIDTH * 4, BATCH * WIDTH * 4, BATCH * 4 * 4]


def scripted_costs(monkeypatch, values: list[float]) -> list[int]:
    """Measured costs replaced by values in turn (one per measurement); returns their steps."""
    steps, costs = [], iter(values)

    def fake(works, device, rounds, threads):
        value = next(costs)
        return [(value, 2 * value) for _ in works]

    monkeypatch.setattr(simtime, "time_works", fake)
    original = SimClock.measure_work

    def spy(self, module, build, device, step=0):
        steps.append(step)
        original(self, module, build, device, step)

    monkeypatch.setattr(SimClock, "measure_work", spy)
    return steps


def test_remeasured_at_the_configured_cadence_and_combined_by_median(monkeypatch):
    steps = scripted_costs(monkeypatch, [1.0, 10.0, 2.0, 3.0, 1.0, 4.0, 7.0])
    (clock,) = simulate(20, remeasure_every_n_steps=6)
    assert steps == [0, 4, 6, 12, 16, 18]  # every 6, and the EARLY_TIMINGS 4 and 16
    assert clock.fwd_ms == [2.5] * 3 and clock.bwd_ms == [5.0] * 3  # median of 1, 10, 2, 3, 1, 4
    steps.clear()
    simulate(10, remeasure_every_n_steps=0)
    assert steps == [0]


def test_clock_state_resumes_and_reads_older_checkpoints(monkeypatch):
    scripted_costs(monkeypatch, [1.0, 3.0, 2.0, 5.0])
    (clock,) = simulate(9, remeasure_every_n_steps=3)  # measured at steps 0, 3, 4, 6
    resumed = make_clock(remeasure_every_n_steps=3)
    resumed.load_state_dict(copy.deepcopy(clock.state_dict()))
    assert (resumed.fwd_ms, resumed.samples, resumed.elapsed_ms) == (
        clock.fwd_ms,
        clock.samples,
        clock.elapsed_ms,
    )
    assert resumed.measured_at == 6 and not resumed.due(6) and resumed.due(9)
    old = {"fwd_ms": [1.0], "bwd_ms": [2.0], "out_bytes": [8], "elapsed_ms": 30.0}
    resumed.load_state_dict(old)  # before re-measurement: one first-batch timing
    assert resumed.fwd_ms == [1.0] and resumed.elapsed_ms == 30.0 and resumed.due(9)
    counted = make_clock(cost="flops")
    counted.load_state_dict(clock.state_dict())  # timed costs do not carry over to flops
    assert not counted.measured and counted.due(7) and counted.elapsed_ms == clock.elapsed_ms


def test_simtime_config_keys_are_checked():
    assert load_config(None, ["simtime.measure_reps=3"]).simtime.measure_reps == 3
    with pytest.raises(ConfigError, match="simtime.cost"):
        load_config(None, ["simtime.cost=flop"])
    for bad in ("flops_per_s=0", "remeasure_every_n_steps=-1", "measure_threads=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [f"simtime.{bad}"])


def test_optimizer_steps_are_timed_per_component_and_leave_no_trace(tmp_path):
    """simtime.optimizer_step: each component's optimizer step, timed on copies of its
    parameters, joins its forward and backward in the simulated step; the run's weights,
    optimizer state and random numbers are untouched."""
    from mach_lightning.sim import create_topology
    from mach_lightning.sim.step import measure

    from .conftest import tiny_overrides

    extra = ("topology.name=sync", "model.num_components=2", "model.width=256",
             "simtime.optimizer_step=true", "simtime.measure_reps=3")  # fmt: skip
    cfg = load_config(None, tiny_overrides(tmp_path, *extra))
    module = create_topology(cfg, (1, 64, 64), 10)  # c0: 4096x256 weights; c1: 256x256, 256x10
    x = torch.randn(BATCH, 1, 64, 64)
    state, rng = copy.deepcopy(module.state_dict()), torch.get_rng_state()
    clock = module.sim_clock
    measure(clock, module, x, 0)
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert len(clock.opt_ms) == 2 and clock.opt_ms[0] > 2 * clock.opt_ms[1] > 0  # ~12x the work
    with_step = clock.step_ms(SimLayout(parallel=False))
    timed = sum(clock.fwd_ms) + sum(clock.bwd_ms) + sum(clock.opt_ms) + 2 * clock.comm_ms(0)
    assert with_step == pytest.approx(timed)
    resumed = SimClock(cfg.simtime, [1.0, 1.0])
    resumed.load_state_dict(copy.deepcopy(clock.state_dict()))
    assert resumed.opt_ms == clock.opt_ms
    cfg.simtime.optimizer_step = False  # off (the default): forward and backward only
    without = SimClock(cfg.simtime, [1.0, 1.0])
    without.load_state_dict(copy.deepcopy(clock.state_dict()))
    assert without.opt_ms == [] and without.step_ms(SimLayout(parallel=False)) < with_step
