"""The simulator's machinery on its own: schedules, stored forwards, replay buffers, weights,
DC-ASGD, simulated time, diagnostics."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mach_lightning.config import Config, ConfigError, load_config
from mach_lightning.core import weights
from mach_lightning.core.dcasgd import DCASGD
from mach_lightning.core.replay import ReplayBuffer
from mach_lightning.core.stored import StoredForwards
from mach_lightning.sim import diagnostics
from mach_lightning.sim.simtime import SimClock, SimLayout
from mach_lightning.sim.staleness import create_schedule, list_schedules


def staleness_cfg(**values):
    cfg = OmegaConf.structured(Config).staleness
    for key, value in values.items():
        cfg[key] = value
    return cfg


# ----- schedules -----


def test_every_schedule_is_registered_and_validated_by_the_config():
    expected = "constant pipeline list uniform geometric straggler".split()
    assert set(list_schedules()) >= set(expected)
    with pytest.raises(ConfigError, match="Valid choices"):
        load_config(None, ["staleness.schedule=pipelin"])


@pytest.mark.parametrize(
    "schedule, extra, expected",
    [
        ("constant", {"k": 3}, [3, 3, 3, 3]),
        ("pipeline", {}, [3, 2, 1, 0]),
        ("list", {"delays": [5, 0, 2, 1]}, [5, 0, 2, 1]),
        ("straggler", {"straggler_component": 1, "straggler_factor": 2.5}, [0, 2, 0, 0]),
    ],
)
def test_deterministic_schedules(schedule, extra, expected):
    sched = create_schedule(staleness_cfg(schedule=schedule, **extra), 4)
    assert sched.delays(0) == sched.delays(17) == expected
    assert schedule in sched.describe()


@pytest.mark.parametrize("schedule", ["uniform", "geometric"])
def test_random_schedule_is_reproducible_from_its_seed(schedule):
    def draws(seed, steps=range(200)):
        sched = create_schedule(staleness_cfg(schedule=schedule, cap=5, seed=seed), 3)
        return [sched.delays(t) for t in steps]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert draws(7, [150, 3]) == [draws(7)[150], draws(7)[3]]  # any order: resumable
    flat = [d for row in draws(7) for d in row]
    assert min(flat) == 0 and max(flat) == 5
    run_seeded = create_schedule(staleness_cfg(schedule=schedule, cap=5), 3, run_seed=7)
    assert [run_seeded.delays(t) for t in range(200)] == draws(7)  # seed null: the run's seed


def test_geometric_delays_follow_p():
    sched = create_schedule(staleness_cfg(schedule="geometric", p=0.5, cap=50, seed=0), 1)
    draws = torch.tensor([sched.delays(t)[0] for t in range(4000)], dtype=torch.float)
    assert float((draws == 0).float().mean()) == pytest.approx(0.5, abs=0.03)
    assert float(draws.mean()) == pytest.approx(1.0, abs=0.1)  # (1 - p) / p


def test_straggler_works_one_step_in_factor():
    sched = create_schedule(
        staleness_cfg(schedule="straggler", straggler_component=2, straggler_factor=3.0), 3
    )
    active = [sched.active(t) for t in range(30)]
    assert sum(a[2] for a in active) == 10 and all(a[0] and a[1] for a in active)
    assert sched.slowdowns() == [1.0, 1.0, 3.0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["staleness.schedule=list"], "one delay >= 0 per component"),
        (["staleness.k=-1"], "staleness.k"),
        (["staleness.p=0"], "staleness.p"),
        (["staleness.straggler_factor=0.5"], "straggler_factor"),
        (["staleness.schedule=straggler", "staleness.straggler_component=2"], "use 0..1"),
        (["local.async_buffer=-2"], "async_buffer"),
        (["simtime.link_bandwidth_gbs=0"], "link_bandwidth_gbs"),
    ],
)
def test_semantic_checks_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.num_components=2", *overrides])


# ----- queues, buffers, weights -----


def test_stored_forwards_round_trip_without_transient_graphs():
    layer = nn.Linear(4, 3)
    stored = StoredForwards("stash", [layer])
    run = lambda w, h: weights.functional_forward(layer, w[0], h)  # noqa: E731
    stored.forward(3, run, (torch.ones(2, 4),), due=5)
    stored.forward(4, run, (torch.ones(2, 4),), due=5)
    assert stored.due(5) == [3, 4] and stored.due(4) == []
    assert "_out" in stored.records[3]  # the kept graph, never checkpointed
    restored = StoredForwards("stash", [layer])
    restored.load_state_dict(copy.deepcopy(stored.state_dict()))
    assert "_out" not in restored.records[3] and restored.records[3]["due"] == 5
    assert torch.equal(restored.weights(3)[0]["weight"], layer.weight.detach())
    # inputs (2 x 32 bytes), weight copies (2 x 60) once each: no graph after the round trip
    assert restored.held_bytes() == 2 * 32 + 2 * 60


def test_replay_buffer_keeps_the_last_capacity_items_and_samples_from_seed():
    buffer = ReplayBuffer(3)
    for step in range(5):
        buffer.append({"step": step})
    assert sorted(e["step"] for e in buffer.entries) == [2, 3, 4]
    pick = [buffer.sample(torch.Generator().manual_seed(s))["step"] for s in range(20)]
    assert pick == [buffer.sample(torch.Generator().manual_seed(s))["step"] for s in range(20)]
    restored = ReplayBuffer(3)
    restored.load_state_dict(buffer.state_dict())
    restored.append({"step": 5})
    assert sorted(e["step"] for e in restored.entries) == [3, 4, 5]


def test_stashed_params_give_the_old_weights_gradient_to_the_live_ones():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    old = {n: p.detach().clone() for n, p in layer.named_parameters()}
    x = torch.randn(5, 4)
    with torch.no_grad():
        layer.weight.add_(1.0)  # an optimizer step happened since
    weights.functional_forward(layer, weights.stashed_params(layer, old), x).pow(2).sum().backward()
    reference = nn.Linear(4, 3)
    reference.load_state_dict(old)
    reference(x).pow(2).sum().backward()
    assert torch.equal(layer.weight.grad, reference.weight.grad)


def test_frozen_buffers_restore_batchnorm_statistics():
    bn = nn.BatchNorm1d(4)
    before = copy.deepcopy(bn.state_dict())
    with weights.frozen_buffers(bn):
        bn(torch.randn(8, 4))
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())


# ----- DC-ASGD -----


def _params_and_grads(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [
        nn.Parameter(torch.randn(4, 3, generator=gen)),
        nn.Parameter(torch.randn(3, generator=gen)),
    ]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(5)]
    return params, grads


def test_dcasgd_with_lambda_zero_is_the_base_optimizer_exactly():
    a, grads = _params_and_grads()
    b = [nn.Parameter(p.detach().clone()) for p in a]
    plain = torch.optim.Adam(a, lr=0.01)
    wrapped = DCASGD(torch.optim.Adam(b, lr=0.01), lam=0.0)
    for step_grads in grads:
        for pa, pb, g in zip(a, b, step_grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        plain.step()
        wrapped.set_stale_weights([torch.zeros_like(p) for p in b], staleness=3)
        wrapped.step()
    assert all(torch.equal(pa, pb) for pa, pb in zip(a, b))
    assert wrapped.state_dict()["state"][0]["step"] == plain.state_dict()["state"][0]["step"]


def test_dcasgd_matches_the_hand_computation():
    params, grads = _params_and_grads()
    lr, lam = 0.1, 0.5
    w_then = [p.detach() - 0.3 for p in params]
    expected = [
        p.detach() - lr * (g + lam * g * g * (p.detach() - w))
        for p, g, w in zip(params, grads[0], w_then)
    ]
    optimizer = DCASGD(torch.optim.SGD(params, lr=lr), lam=lam)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    optimizer.set_stale_weights(w_then, staleness=2)
    optimizer.step()
    assert all(torch.allclose(p, e, rtol=0, atol=1e-7) for p, e in zip(params, expected))


def test_dcasgd_staleness_scaled_learning_rate_and_scheduler_share_groups():
    params, grads = _params_and_grads()
    start = [p.detach().clone() for p in params]
    optimizer = DCASGD(torch.optim.SGD(params, lr=0.1), lam=0.0, lr_scaling=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    optimizer.set_stale_weights([None, None], staleness=4)
    optimizer.step()
    assert all(torch.allclose(p, s - 0.1 / 4 * g) for p, s, g in zip(params, start, grads[0]))
    scheduler.step()
    assert optimizer.base.param_groups[0]["lr"] == pytest.approx(0.05)


# ----- simulated time and diagnostics -----


def _clock(**sim):
    cfg = OmegaConf.structured(Config).simtime
    for key, value in sim.items():
        cfg[key] = value
    return SimClock(cfg, slowdowns=[1.0, 2.0, 1.0])


def test_sim_time_model_chain_versus_parallel():
    clock = _clock(link_latency_us=1000.0, link_bandwidth_gbs=1.0)  # 1 ms + 1 ms per MB
    clock.fwd_ms, clock.bwd_ms, clock.out_bytes = (
        [1.0, 2.0, 3.0],
        [2.0, 4.0, 6.0],
        [10**6, 10**6, 0],
    )
    # sync: (3 + 2*6 + 9) compute (component 1 is 2x slow) + 2 links x 2 messages x 2 ms
    assert clock.step_ms(SimLayout(parallel=False)) == pytest.approx(24.0 + 8.0)
    assert clock.step_ms(SimLayout(parallel=True)) == pytest.approx(12.0 + 4.0)
    assert clock.step_ms(
        SimLayout(parallel=True, messages_per_link=1, extra_forwards=1.0, rates=[1.0, 0.5, 1.0])
    ) == pytest.approx(12.0 + 2.0)
    for _ in range(3):
        clock.tick(SimLayout(parallel=True))
    assert clock.metrics() == {"time/sim_step_ms": 16.0, "time/sim_elapsed_s": 0.048}
    clock.tick(SimLayout(parallel=False))  # a step's time is cached, but per layout...
    assert clock.metrics()["time/sim_step_ms"] == pytest.approx(32.0)
    clock.fwd_ms, clock.bwd_ms = [0.5, 1.0, 1.5], [1.0, 2.0, 3.0]  # ...and per measurement
    clock.tick(SimLayout(parallel=False))
    assert clock.metrics()["time/sim_step_ms"] == pytest.approx(12.0 + 8.0)


def test_sim_time_measurement_leaves_no_trace():
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), nn.Linear(8, 3)])
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(16, 8)
    rng = torch.get_rng_state()
    clock = _clock(measure_reps=2)
    clock.measure(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert (
        len(clock.fwd_ms) == 2
        and min(clock.bwd_ms) > 0
        and clock.out_bytes == [16 * 8 * 4, 16 * 3 * 4]
    )


def test_staleness_tracker_window_and_histogram():
    tracker = diagnostics.StalenessTracker(2)
    for d in (2, 2, 4):
        tracker.record(0, d)
    assert tracker.window_metrics() == {"diag/staleness_c0": pytest.approx(8 / 3)}
    assert tracker.window_metrics() == {}
    restored = diagnostics.StalenessTracker(2)
    restored.load_state_dict(tracker.state_dict())
    assert restored.histogram_metrics() == {
        "diag/staleness_hist_c0_d2": 2.0,
        "diag/staleness_hist_c0_d4": 1.0,
    }


def test_true_sync_gradient_is_backprop_and_cosine_of_itself_is_one():
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Linear(6, 5), nn.Linear(5, 3)])
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    grads = diagnostics.true_sync_gradients(model, x, y)
    torch.nn.functional.cross_entropy(model[1](model[0](x)), y).backward()
    assert torch.equal(grads[0][0], model[0].weight.grad)
    assert diagnostics.cosine(
        grads[1], [model[1].weight.grad, model[1].bias.grad]
    ) == pytest.approx(1.0)
    assert diagnostics.cosine(grads[1], [-g for g in grads[1]]) == pytest.approx(-1.0)


def test_probe_holds_only_batches_applied_at_a_probe_step():
    probe = diagnostics.GradientProbe(every_n_steps=5)  # probes at steps 4, 9, ...
    probe.keep(1, "x1", "y1", [1, 3])  # applied at 1 and 3: never probed
    probe.keep(2, "x2", "y2", [2, 4])  # applied at step 4: held until then
    assert list(probe.batches) == [2]
    probe.forget(3)
    assert list(probe.batches) == [2]
    probe.forget(4)
    assert probe.batches == {}
