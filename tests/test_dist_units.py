"""The dist runtime's parts without processes or a Trainer: the wire format, a real gloo link
between two threads, and each method's lockstep step (all nodes local) against the simulator's
driver, gradient for gradient."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import seed_everything

from mach_lightning.config import load_config
from mach_lightning.config.checks import FREE_METHODS
from mach_lightning.core.messages import ACTIVATION, GRADIENT, Message
from mach_lightning.data import create_datamodule
from mach_lightning.dist import wire
from mach_lightning.dist.lockstep import LockstepProcess
from mach_lightning.dist.transport import HEADER_SLOT, Link, PeerError
from mach_lightning.dist.worker import step_optimizers
from mach_lightning.methods import list_topologies, rule_class
from mach_lightning.sim import create_topology

PEER = Path(__file__).parent / "link_peer.py"


def test_wire_round_trip_keeps_headers_context_and_grad_flags():
    x = torch.randn(3, 4, requires_grad=True)
    labels = torch.tensor([1, 0, 2])
    m = Message(ACTIVATION, 7, 1, 2, x * 2, step=5, context={"labels": labels, "act": x})
    m.version = 3
    headers, tensors = wire.encode([(m, 9)])
    ((back, due, grads),) = wire.decode(headers, [t.detach().clone() for t in tensors])
    assert (back.kind, back.batch, back.sender, back.receiver, back.step, back.version) == (
        ACTIVATION, 7, 1, 2, 5, 3
    )  # fmt: skip
    assert due == 9 and grads == [True, True, False]  # the tensor, then context keys sorted
    assert torch.equal(back.tensor, (x * 2).detach())
    assert torch.equal(back.context["labels"], labels)


def test_optional_tensors_keep_their_gaps():
    a, b = torch.ones(2), torch.zeros(3)
    mask, present = wire.encode_optional([a, None, b])
    assert mask == [True, False, True]
    assert wire.decode_optional(mask, present) == [a, None, b]


@contextlib.contextmanager
def linked_peer(*mode: str, timeout_s: float = 20.0, store=None):
    """A real gloo link to a peer process (tests/link_peer.py); the peer is ended after."""
    store = store or dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    peer = subprocess.Popen([sys.executable, str(PEER), str(store.port), *mode])
    try:
        link = Link(store, 0, 1, timeout_s=30)  # the peer's start-up (imports) may take a while
        link.timeout = timedelta(seconds=timeout_s)  # then every receive waits this long
        yield link
    finally:
        if peer.poll() is None:
            peer.kill()
        peer.wait(30)


def test_bundles_of_changing_sizes_and_a_large_header_come_back_whole():
    shapes = [(4, 8), (4, 8), (2, 3), (4, 8), (16, 16)]  # same, same, smaller, back, larger
    # numpy copies most dtypes into the bundle; bfloat16 (numpy has none) goes through torch
    extra = [torch.randn(3).bfloat16(), torch.tensor(2.5), torch.tensor([True, False])]
    sent = [[torch.randn(*s), torch.arange(5), *extra] for s in shapes]
    big = {"note": "x" * (3 * HEADER_SLOT)}  # a header larger than the least slot
    with linked_peer("echo", str(len(shapes))) as link:
        for i, tensors in enumerate(sent):
            link.send_bundle(4, big if i == 2 else {"i": i}, tensors)
            header, back = link.recv_bundle(5)
            given = big if i == 2 else {"i": i}
            assert {key: header[key] for key in given} == given
            assert [t.dtype for t in back] == [e.dtype for e in tensors]
            assert [torch.equal(t, e) for t, e in zip(back, tensors)] == [True] * 5
        link.flush()
        assert link.stats.messages == len(shapes) and link.stats.bytes > 0


def test_a_silent_peer_is_named_within_the_link_timeout():
    with linked_peer("silent", timeout_s=1.0) as link:
        started = time.monotonic()
        with pytest.raises(PeerError, match="component process 1: nothing received"):
            link.recv_bundle(0)
        assert time.monotonic() - started < 10


def test_a_peer_that_ends_waits_until_its_last_bundle_is_read_and_one_that_does_not_is_named():
    """Free mode left a process's last sends in flight at its exit; the peer still reading them
    saw a crash (CI: 'component process 2 exited with code 0'). Leaving together waits."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with linked_peer("last-and-leave", store=store) as link:
        time.sleep(1.0)  # a slow reader: the peer has long finished its step
        header, (tensor,) = link.recv_bundle(5)
        assert header["step"] == 11 and torch.equal(tensor, torch.arange(1000.0))
        assert store.check(["finished/1"])  # the peer is done, and waits
        store.set("finished/0", "1")  # lets it go
    with linked_peer("last-and-exit") as link:
        time.sleep(1.0)
        with pytest.raises(PeerError, match="component process 1"):  # named, not a gloo trace
            link.recv_bundle(5)


def build(name: str, k: int = 3):
    cfg = load_config(None, [f"topology.name={name}", f"model.num_components={k}", "seed=0"])
    seed_everything(0, verbose=False)
    datamodule = create_datamodule(cfg.data, cfg.seed)
    datamodule.prepare_data()
    module = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    datamodule.setup("fit")
    return module, datamodule


@pytest.mark.parametrize("name", list_topologies())
def test_lockstep_step_cut_at_every_link_equals_the_simulators_one_backward(name):
    """All nodes in one process, but every message a leaf with its gradient handed back (as
    between processes): every parameter's gradient equals the simulator's at every step."""
    sim, datamodule = build(name)
    cut, _ = build(name)
    cut.rule.process_of = lambda index: 0
    process = LockstepProcess(cut.rule, 0, {})
    sim_opt, cut_opt = sim.configure_optimizers()[0], cut.configure_optimizers()[0]
    for t, (x, y) in zip(range(5), datamodule.train_dataloader()):
        delays, active = sim.schedule.delays(t), sim.schedule.active(t)
        result = sim.driver.forward(x, y, t, delays, active)
        for o in sim_opt + cut_opt:
            o.zero_grad(set_to_none=True)
        result.objective.backward()
        sim.driver.after_backward(result, t)
        outs = process.step(x, y, t, delays, active)
        for (key, p), q in zip(sim.named_parameters(), cut.parameters()):
            if q.grad is None:  # the simulator's 0 * parameter of a node that updates nothing
                assert p.grad is None or not p.grad.any(), (t, key)
                continue
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=key)
        step_optimizers(sim.driver.nodes, result.outboxes, sim_opt)
        step_optimizers(process.mine, outs, cut_opt)


def test_a_message_on_a_link_the_rule_does_not_declare_is_refused():
    module, datamodule = build("sync", k=2)
    module.rule.links = lambda: []  # node 0 still sends to node 1
    module.rule.process_of = lambda index: 0
    process = LockstepProcess(module.rule, 0, {})
    x, y = next(iter(datamodule.train_dataloader()))
    with pytest.raises(RuntimeError, match="which rule.links\\(\\) does not list"):
        process.step(x, y, 0, [0, 0], None)


def test_gradient_messages_go_back_along_the_link_they_answer():
    """delayed, K=2 on two processes' worth of state: node 1's late gradient for node 0 is
    queued in node 0's own in-flight messages, due `delay` steps later."""
    module, datamodule = build("delayed", k=2)
    module.rule.process_of = lambda index: 0
    process = LockstepProcess(module.rule, 0, {})
    x, y = next(iter(datamodule.train_dataloader()))
    delays = module.schedule.delays(0)
    process.step(x, y, 0, delays, None)
    pending = process.in_flight.pending()
    assert [(m.kind, m.sender, m.receiver, m.batch) for m in pending] == [(GRADIENT, 1, 0, 0)]
    assert process.in_flight.take_due(delays[0] - delays[1], 0) == pending


@pytest.mark.parametrize("name", list_topologies())
def test_free_mode_is_offered_by_exactly_the_rules_that_run_it(name):
    """config/checks.FREE_METHODS (what runtime.mode=free accepts) is the rules' own `free`."""
    assert rule_class(name).free == (name in FREE_METHODS)
    if rule_class(name).free:
        rule = build(name)[0].rule
        delays = rule.free_delays()
        assert len(delays) == 3
        if name.startswith("mach"):  # every consumed embedding's gradient comes as a message
            consumed = [bool(rule.graph.consumers(j)) for j in range(3)]
            assert [d > 0 for d in delays] == consumed and any(consumed)
            return
        assert delays[-1] == 0  # the top needs no gradient from above
        decoupled = [d > 0 for d in delays[:-1]]
        assert decoupled == ([True, True] if name in ("delayed", "dni", "cdni") else [False, False])
