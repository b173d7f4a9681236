"""The multi-process runtime (runtime.name=dist): real processes over gloo, against the simulator.

Lockstep mode must run the simulator's maths: every method's per-step training losses with one
process per component equal the committed golden losses of the simulator (tests/golden/), within
float tolerance (each process sums its own gradients, in its own order).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mach_lightning.config import ConfigError, load_config
from mach_lightning.fit import EXIT_DIST
from mach_lightning.methods import list_topologies
from mach_lightning.training import run_fit

from .conftest import tiny_overrides
from .test_fit import column, read_metrics
from .test_golden import GOLDEN_STEPS, assert_matches_golden

pytestmark = pytest.mark.timeout(300)


def dist_cfg(tmp_path, *extra: str):
    return load_config(
        None,
        tiny_overrides(
            tmp_path,
            "runtime.name=dist",
            "runtime.timeout_s=60",
            "seed=0",
            f"trainer.max_steps={GOLDEN_STEPS}",
            "trainer.log_every_n_steps=1",
            "trainer.deterministic=true",
            "trainer.test_after_fit=false",
            *extra,
        ),
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list_topologies())
def test_lockstep_equals_simulator_golden(name, tmp_path):
    result = run_fit(dist_cfg(tmp_path, f"topology.name={name}", "model.num_components=3"))
    assert_matches_golden(name, column(read_metrics(result["run_dir"]), "train/loss"))
    if name.startswith("mach"):  # every process forgets the forwards no gradient can reach
        assert max_stored_forwards(Path(result["run_dir"])) <= 4  # all 11 before the fix


def max_stored_forwards(run_dir: Path) -> int:
    """The most stored forwards one node holds in any component checkpoint of a run."""
    counts = [0]
    for ckpt in (run_dir / "components").glob("c*/ckpt/s*.pt"):
        process = torch.load(ckpt, weights_only=False)["process"]
        counts += [len(records) for records in process["stored"].values()]
    return max(counts)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["delayed", "mach_seq"])
def test_two_processes_equal_the_simulator(name, tmp_path):
    """K=2: the same config through both runtimes, side by side on this machine."""
    extra = (f"topology.name={name}", "model.num_components=2")
    dist_run = run_fit(dist_cfg(tmp_path / "dist", *extra))
    sim_run = run_fit(dist_cfg(tmp_path / "sim", *extra, "runtime.name=sim"))
    dist_losses = column(read_metrics(dist_run["run_dir"]), "train/loss")
    sim_losses = column(read_metrics(sim_run["run_dir"]), "train/loss")
    assert len(dist_losses) == GOLDEN_STEPS
    assert dist_losses == pytest.approx(sim_losses, rel=1e-5, abs=1e-6)
    # the same run directory as a simulated run, plus one directory per component process
    run_dir = Path(dist_run["run_dir"])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "finished" and result["step"] == GOLDEN_STEPS
    assert 0.0 <= result["val/acc"] <= 1.0
    for rank in range(2):
        component = run_dir / "components" / f"c{rank}"
        assert (component / "weights.pt").is_file() and (component / "metrics.csv").is_file()
        assert f"time/real_step_ms_c{rank}" in result
        assert 0.0 <= result[f"time/wait_frac_c{rank}"] <= 1.0
    assert result["link/mb_per_s_c0-c1"] > 0 and result["link/mb_per_s_c1-c0"] > 0

    # validated at every epoch's end, as the simulator is: the same accuracy at the same step
    def val_by_step(rows: list[dict]) -> dict[int, float]:
        return {int(float(r["step"])): float(r["val/acc"]) for r in rows if r.get("val/acc")}

    dist_val = val_by_step(read_metrics(run_dir))
    sim_val = val_by_step(read_metrics(sim_run["run_dir"]))
    epoch_end = min(sim_val)
    assert epoch_end < GOLDEN_STEPS
    assert dist_val[epoch_end] == pytest.approx(sim_val[epoch_end], abs=1e-6)
    assert (run_dir / "components" / "c0" / "epochs" / "e0.pt").is_file()


def start_long_run(tmp_path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """`fit` with runtime.name=dist in its own process, trained long enough to be stopped."""
    overrides = tiny_overrides(
        tmp_path,
        "runtime.name=dist",
        "topology.name=delayed",
        "model.num_components=3",
        "trainer.max_epochs=1000",
        "trainer.log_every_n_steps=1",
        "run.id=long",
        *extra,
    )
    command = [sys.executable, "-m", "mach_lightning.fit", *overrides]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "default" / "long"
    deadline = time.monotonic() + 120
    while not all((run_dir / "components" / f"c{r}" / "metrics.csv").is_file() for r in range(3)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the component processes never started training"
        time.sleep(0.2)
    return proc, run_dir


def component_pids(run_dir: Path) -> list[int]:
    return [int((run_dir / "components" / f"c{r}" / "pid").read_text()) for r in range(3)]


def assert_gone(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        pytest.fail(f"component process {pid} is still running")


@pytest.mark.slow
def test_a_killed_component_is_named_and_no_process_is_left(tmp_path):
    proc, run_dir = start_long_run(tmp_path)
    pids = component_pids(run_dir)
    started = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_DIST, err
    assert time.monotonic() - started < 30
    assert "component process 1" in err and "killed by signal 9" in err, err
    assert_gone(pids)
    assert not (run_dir / "result.json").exists()


@pytest.mark.slow
def test_a_coordinator_killed_by_sigkill_takes_its_component_processes_with_it(tmp_path):
    proc, run_dir = start_long_run(tmp_path)
    pids = component_pids(run_dir)
    proc.kill()  # no clean-up of its own can run
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert [pid for pid in pids if alive(pid)] == []
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by whoever adopted it, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.slow
def test_a_hung_component_is_named_within_the_timeout(tmp_path):
    proc, run_dir = start_long_run(tmp_path, "runtime.timeout_s=4")
    pids = component_pids(run_dir)
    started = time.monotonic()
    os.kill(pids[2], signal.SIGSTOP)  # alive, silent: only a timeout finds it
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        for pid in pids:  # a stopped process the coordinator failed to end would linger
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == EXIT_DIST, err
    assert 4 <= time.monotonic() - started < 40
    assert "component process 2" in err and "stopped answering" in err, err
    assert "runtime.timeout_s=4" in err
    assert_gone(pids)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("runtime.mode=free runtime.queue=0", "runtime.queue must be at least 1"),
        ("runtime.mode=free runtime.sleep_ms=[1,2,3,4]", "runtime.sleep_ms has 4 entries"),
        (
            "topology.name=dni model.num_components=2 runtime.synthesizer=oracle "
            "runtime.sleep_ms=[0,0,0,0]",
            "runtime.sleep_ms has 4 entries for 3 processes",
        ),
        ("runtime.mode=often", "Valid choices: lockstep, free"),
        ("trainer.precision=bf16-mixed", "trainer.precision=bf16-mixed is for the simulator"),
        ("trainer.devices=2", "trainer.devices=2 is for the simulator"),
        ("runtime.timeout_s=0", "runtime.timeout_s must be positive"),
    ],
)
def test_dist_settings_the_runtime_cannot_honour_are_refused(override, expected, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        dist_cfg(tmp_path, *override.split())


# ----- free mode: nobody waits longer than its method requires -----


@pytest.mark.slow
def test_free_sync_waits_for_everything_so_it_equals_the_golden(tmp_path):
    result = run_fit(dist_cfg(tmp_path, "topology.name=sync", "model.num_components=3",
                              "runtime.mode=free"))  # fmt: skip
    assert_matches_golden("sync", column(read_metrics(result["run_dir"]), "train/loss"))


@pytest.mark.slow
def test_free_local_never_waits_on_a_gradient_and_equals_the_simulator(tmp_path):
    """No gradient crosses a link, so however the processes interleave the maths is the
    simulator's with every delay 0 (free mode's delays for local)."""
    extra = ("topology.name=local", "model.num_components=3", "trainer.max_steps=12")
    free = run_fit(dist_cfg(tmp_path / "free", *extra, "runtime.mode=free", "runtime.queue=4"))
    sim = run_fit(dist_cfg(tmp_path / "sim", *extra, "runtime.name=sim",
                           "staleness.schedule=constant", "staleness.k=0"))  # fmt: skip
    free_losses = column(read_metrics(free["run_dir"]), "train/loss")
    assert len(free_losses) == 12
    assert free_losses == pytest.approx(column(read_metrics(sim["run_dir"]), "train/loss"),
                                        rel=1e-5, abs=1e-6)  # fmt: skip


def free_delayed(tmp_path, *extra: str) -> dict:
    """A K=2 free delayed run; its result.json (staleness measured from the headers). Its 40
    steps fit in one epoch: an epoch's end checkpoints, which first drains the pipeline."""
    cfg = dist_cfg(tmp_path, "topology.name=delayed", "model.num_components=2",
                   "runtime.mode=free", "trainer.max_steps=40", "data.batch_size=16",
                   "trainer.log_every_n_steps=10",
                   *extra)  # fmt: skip
    return json.loads((Path(run_fit(cfg)["run_dir"]) / "result.json").read_text())


def staleness_hist(result: dict, component: int) -> dict[int, float]:
    prefix = f"diag/staleness_hist_c{component}_d"
    return {int(k[len(prefix) :]): v for k, v in result.items() if k.startswith(prefix)}


@pytest.mark.slow
def test_free_delayed_staleness_is_measured_and_grows_behind_a_slow_receiver(tmp_path):
    """A slow sender gets each gradient back before its next step (staleness 1); behind a slow
    receiver it runs ahead as far as its queue allows, so the staleness it applies grows with
    runtime.queue: one more step per extra send in flight."""
    slow_sender = free_delayed(tmp_path / "a", "runtime.sleep_ms=[25,0]")
    assert staleness_hist(slow_sender, 0) == {1: pytest.approx(39, abs=1)}
    assert slow_sender["time/wait_frac_c1"] > 0.5  # the receiver waits for its input
    means = {}
    for q in (1, 3):
        result = free_delayed(tmp_path / f"q{q}", "runtime.sleep_ms=[0,25]", f"runtime.queue={q}")
        hist = staleness_hist(result, 0)
        assert sum(hist.values()) >= 30  # the gradients of almost every batch were applied
        means[q] = sum(d * n for d, n in hist.items()) / sum(hist.values())
        assert q + 1 <= means[q] <= q + 3, hist
        assert result["time/wait_frac_c0"] > 0.3  # the sender waits for room in its queue
        assert result["status"] == "finished" and result["val/acc"] > 0.2
    assert means[3] - means[1] == pytest.approx(2.0, abs=0.75)


@pytest.mark.slow
def test_free_checkpoints_at_epoch_ends_lose_no_gradient(tmp_path):
    """40 steps over four epochs (three epoch-end checkpoints, each draining the answers in
    flight): every gradient but the last batch's is still applied."""
    extra = ("runtime.sleep_ms=[25,0]", "data.batch_size=128", "trainer.max_epochs=10")
    result = free_delayed(tmp_path, *extra)
    assert staleness_hist(result, 0) == {1: pytest.approx(39, abs=1)}
    ckpts = Path(result_dir(tmp_path)) / "components" / "c0" / "ckpt"
    assert sorted(p.name for p in ckpts.glob("s*.pt")) == ["s22.pt", "s33.pt"]  # the last two


@pytest.mark.slow
def test_free_dni_steps_on_its_synthesizer_and_regresses_when_the_true_gradient_comes(tmp_path):
    """c0 never waits for c1's gradient: behind a slow receiver its synthesizer's targets come
    as late as its queue lets it run ahead (not 1, as when c0 is the slow one). A warm-up (the
    true gradient, waited for) runs in free mode too."""
    runs = {
        "slow sender": ("runtime.sleep_ms=[25,0]",),
        "slow receiver": ("runtime.sleep_ms=[0,25]", "runtime.queue=3"),
        "warm-up": ("synth.warmup_steps=10", "topology.name=cdni"),
    }
    results = {name: free_delayed(tmp_path / name.replace(" ", "_"), "topology.name=dni", *extra)
               for name, extra in runs.items()}  # fmt: skip
    assert staleness_hist(results["slow sender"], 0) == {1: pytest.approx(39, abs=1)}
    late = staleness_hist(results["slow receiver"], 0)
    assert sum(late.values()) >= 30 and sum(d * n for d, n in late.items()) / sum(late.values()) > 2
    assert sum(staleness_hist(results["warm-up"], 0).values()) == pytest.approx(29, abs=1)
    for result in results.values():
        assert result["status"] == "finished" and result["step"] == 40
        assert result["val/acc"] > 0.2  # digits: chance is 0.1
        assert 0 < result["synth/loss_b0"] and -1 <= result["synth/cos_b0"] <= 1


@pytest.mark.slow
def test_lockstep_synthesizers_in_processes_of_their_own_equal_the_golden(tmp_path):
    """runtime.synthesizer=oracle, K=3: 3 component processes and 2 synthesizer processes run
    the simulator's dni maths, step for step."""
    result = run_fit(dist_cfg(tmp_path, "topology.name=dni", "model.num_components=3",
                              "runtime.synthesizer=oracle"))  # fmt: skip
    assert_matches_golden("dni", column(read_metrics(result["run_dir"]), "train/loss"))
    assert len(list((Path(result["run_dir"]) / "components").glob("c*/pid"))) == 5


@pytest.mark.slow
def test_free_dni_with_its_synthesizer_in_a_process_of_its_own(tmp_path):
    """The reference's three processes: input half (c0), output half (c1), the synthesizer (c2).
    Only c2 holds and trains the synthesizer, regressing on the true gradients c1 sends it; c0
    waits for its synthetic gradient every step, so a slow synthesizer process sets its pace."""
    runs = {"even": (), "slow synthesizer": ("runtime.sleep_ms=[0,0,30]",)}
    results = {
        name: free_delayed(tmp_path / name.replace(" ", "_"), "topology.name=dni",
                           "runtime.synthesizer=oracle", *extra)
        for name, extra in runs.items()
    }  # fmt: skip
    for result in results.values():
        assert result["status"] == "finished" and result["step"] == 40
        assert result["val/acc"] > 0.2 and 0 < result["synth/loss_b0"]
        assert sum(staleness_hist(result, 0).values()) == pytest.approx(39, abs=1)
    assert results["slow synthesizer"]["time/real_step_ms_c0"] > 25
    components = result_dir(tmp_path / "slow_synthesizer") / "components"
    weights = {c: torch.load(components / c / "weights.pt")["state"] for c in ("c0", "c1", "c2")}
    assert all(k.startswith("synthesizers.0.") for k in weights["c2"])
    assert not any(k.startswith("synthesizers.") for k in [*weights["c0"], *weights["c1"]])
    c2 = read_metrics(components / "c2")
    assert column(c2, "synth/loss_b0") and column(c2, "diag/staleness_c0")


def free_mach(tmp_path, *extra: str) -> dict:
    """A K=2 free mach_seq run of 22 steps (c1 publishes its embedding to c0); result.json."""
    cfg = dist_cfg(tmp_path, "topology.name=mach_seq", "model.num_components=2",
                   "runtime.mode=free", "trainer.max_steps=22", "trainer.log_every_n_steps=11",
                   *extra)  # fmt: skip
    return json.loads((Path(run_fit(cfg)["run_dir"]) / "result.json").read_text())


@pytest.mark.slow
def test_free_mach_steps_without_a_late_neighbour_and_its_student_stands_in(tmp_path):
    """Behind a slow producer the consumer does not wait: it steps with its student's imitation
    for the embedding not there yet (late inputs counted); a slow consumer finds every one
    there. Both finish every step, and no process keeps the forwards nothing can reach."""
    slow_producer = free_mach(tmp_path / "p", "runtime.sleep_ms=[0,50]")
    slow_consumer = free_mach(tmp_path / "c", "runtime.sleep_ms=[50,0]")
    assert slow_producer["diag/late_input_frac_c0"] > 0.5
    assert slow_consumer["diag/late_input_frac_c0"] < 0.2
    for result in (slow_producer, slow_consumer):
        assert result["status"] == "finished" and result["step"] == 22
        assert result["val/acc_c0"] > 0.5 and result["val/acc_c1"] > 0.5  # digits: chance 0.1
        assert "diag/late_input_frac_c1" not in result  # c1 reads only x
    assert slow_producer["time/wait_frac_c0"] < slow_consumer["time/wait_frac_c1"] + 0.3
    assert max_stored_forwards(result_dir(tmp_path / "p")) <= 2 * 2 + 2  # runtime.queue=2


def result_dir(tmp_path: Path) -> Path:
    return next((tmp_path / "runs" / "default").iterdir())


# ----- checkpoints per component process, and resume -----


def resume_args(tmp_path: Path, run_id: str, *extra: str) -> list[str]:
    return tiny_overrides(
        tmp_path,
        "runtime.name=dist",
        "topology.name=delayed",
        "model.num_components=3",
        "seed=0",
        "trainer.max_epochs=4",
        "trainer.log_every_n_steps=2",
        "trainer.deterministic=true",
        "trainer.test_after_fit=false",
        "run.checkpoint_every_n_steps=4",
        f"run.id={run_id}",
        *extra,
    )


@pytest.mark.slow
def test_a_killed_lockstep_run_resumes_from_its_component_checkpoints_exactly(tmp_path):
    whole = run_fit(load_config(None, resume_args(tmp_path, "whole")))
    command = [sys.executable, "-m", "mach_lightning.fit"]
    cut = subprocess.Popen(
        [*command, *resume_args(tmp_path, "cut", "runtime.sleep_ms=[40]")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    run_dir = tmp_path / "runs" / "default" / "cut"
    saved = [run_dir / "components" / f"c{r}" / "ckpt" / "s8.pt" for r in range(3)]
    deadline = time.monotonic() + 120
    while not all(p.is_file() for p in saved):
        assert cut.poll() is None and time.monotonic() < deadline, cut.communicate()
        time.sleep(0.05)
    pids = component_pids(run_dir)
    os.kill(pids[1], signal.SIGKILL)
    _, err = cut.communicate(timeout=60)
    assert cut.returncode == EXIT_DIST and "component process 1" in err, err
    assert not (run_dir / "result.json").exists()
    with pytest.raises(ConfigError, match="already holds a run"):  # not without resume=true
        run_fit(load_config(None, resume_args(tmp_path, "cut")))
    resumed = run_fit(load_config(None, resume_args(tmp_path, "cut", "resume=true")))
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["resume"] and 8 <= events[0]["step"] < 44
    for key in ("train/loss", "val/acc", "diag/staleness_c0"):
        expected = column(read_metrics(whole["run_dir"]), key)
        assert column(read_metrics(resumed["run_dir"]), key) == expected, key
    assert resumed["metrics"]["val/acc"] == whole["metrics"]["val/acc"]


def test_a_dist_run_refuses_to_resume_with_other_settings(tmp_path):
    run_dir = tmp_path / "runs" / "default" / "changed"
    for rank in range(3):  # what a killed run leaves: its config and a checkpoint per process
        (run_dir / "components" / f"c{rank}" / "ckpt").mkdir(parents=True)
        (run_dir / "components" / f"c{rank}" / "ckpt" / "s4.pt").write_bytes(b"")
    first = load_config(None, resume_args(tmp_path, "changed"))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(first))
    changed = load_config(None, resume_args(tmp_path, "changed", "resume=true", "optim.lr=0.5"))
    with pytest.raises(ConfigError, match="optim.lr"):
        run_fit(changed)
    assert sorted(p.name for p in run_dir.iterdir()) == ["components", "config.yaml"]
