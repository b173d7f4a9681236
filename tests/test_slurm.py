"""The launcher on a real Slurm cluster: the dev cluster of `slurm/dev-cluster.sh` (two nodes on
this machine). They submit real jobs, so they run only against that cluster, recognised by its
ClusterName and slurm.conf (tests/slurm_guard.py): elsewhere they skip, and with CI=true fail."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from mach_lightning.launch import profiles, status, submit
from mach_lightning.launch.sweep import single_job
from mach_lightning.launch.task import ERROR, read_events
from mach_lightning.report.__main__ import main as report_main

from . import slurm_guard
from .conftest import REPO
from .test_launch import SYNC, load_cli, write_sweep
from .test_report import check_in_chromium

pytestmark = pytest.mark.slurm
LOCAL_PROFILE = REPO / "slurm" / "local.yaml"
TINY = ["trainer.max_steps=15", "trainer.log_every_n_steps=5", "logger.wandb.mode=offline"]


@pytest.fixture(scope="module")
def cluster():
    action, why = slurm_guard.decide()  # only the dev cluster, recognised for certain
    if action == "fail":
        pytest.fail(why)
    if action == "skip":
        pytest.skip(why)
    return profiles.load_profile(LOCAL_PROFILE)


def wait_for(entries, timeout=300, seen: dict | None = None) -> list[status.Row]:
    """Poll --status's rows until no job is active; `seen` collects every state shown per job
    and, under "error.txt", every run directory where an error.txt appeared meanwhile."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = status.status_rows(entries)
        if seen is not None:
            for row, (_, run_dir) in zip(rows, entries):
                seen.setdefault(row.key, set()).add(row.state)
                if (Path(run_dir) / ERROR).exists():
                    seen.setdefault(ERROR, set()).add(str(run_dir))
        if not any(r.active for r in rows):
            return rows
        time.sleep(1)
    logs = "\n".join(
        f"== {p}\n{p.read_text(errors='replace')[-2000:]}"
        for _, d in entries
        for p in sorted(Path(d).glob("logs/*"))
        if p.exists()
    )
    pytest.fail(f"jobs still running after {timeout}s:\n{status.format_status(rows)}\n{logs}")


def finished(rows) -> None:
    assert all(r.state == "FINISHED" for r in rows), status.format_status(rows)


def test_tiny_sweep_end_to_end_with_baseline_and_idempotent_relaunch(cluster, tmp_path, capsys):
    # The base config is sync, so the baseline differs by dropping the lr axis (keep: data, model).
    sweep = write_sweep(
        tmp_path,
        "grid: {optim.lr: [0.002, 0.003]}\nseeds: [0]\n"
        "baseline: {overrides: [topology.name=sync], keep: [data., model.]}\n",
    )
    argv = [
        "--sweep",
        str(sweep),
        "--cluster",
        str(LOCAL_PROFILE),
        f"run.root={tmp_path}/runs",
        *TINY,
    ]
    cli = load_cli()
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert first.count(" submit ") == 3, first  # 2 grid jobs + the sync baseline
    run_dirs = sorted((tmp_path / "runs" / "tiny").glob("*__seed-0"))
    assert [d.name for d in run_dirs] == [
        "baseline__seed-0",
        "lr-0.002__seed-0",
        "lr-0.003__seed-0",
    ]
    ids = [status.last_submission(d)["job_id"] for d in run_dirs]
    assert len({i.split("_")[0] for i in ids}) == 1 and all("_" in i for i in ids), ids  # an array
    finished(wait_for([(d.name, d) for d in run_dirs]))

    baseline = yaml.safe_load((run_dirs[0] / "config.yaml").read_text())
    assert baseline["topology"]["name"] == "sync" and baseline["optim"]["lr"] == 0.001
    wandb = baseline["logger"]["wandb"]
    assert wandb["group"] == "tiny" and wandb["job_type"] == "sync"
    assert "baseline" in wandb["tags"] and f"slurm-{ids[0]}" in wandb["tags"]
    assert list(run_dirs[0].glob("wandb/offline-run-*")), "offline W&B run to sync later"
    assert list((run_dirs[0] / "logs").glob("*_0_log.out"))

    assert cli.main(argv) == 0  # relaunch: everything finished, nothing submitted
    again = capsys.readouterr().out
    assert again.count("skip: finished") == 3 and " submit " not in again, again
    shutil.rmtree(run_dirs[1])  # one run lost: the relaunch resubmits exactly that one
    assert cli.main(argv) == 0
    third = capsys.readouterr().out
    assert third.count(" submit ") == 1 and third.count("skip: finished") == 2, third
    finished(wait_for([(d.name, d) for d in run_dirs]))
    assert cli.main(["--status", str(sweep), f"run.root={tmp_path}/runs", *TINY]) == 0
    table = capsys.readouterr().out
    assert table.count("FINISHED") == 3 and "test/acc=" in table, table

    # The comparison report of the sweep, by its name, rendered in a browser.
    out = tmp_path / "report"
    assert report_main(["tiny", "--run-root", str(tmp_path / "runs"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert md.count("| sync, optim.lr=") == 3, md  # the baseline and the two grid points
    assert list(out.glob("*-val-acc-step.png")) and (out / "report.html").is_file()
    check_in_chromium(out, tmp_path, "report-slurm-sweep-screenshot")


def test_two_node_ddp_with_gloo_through_srun(cluster, tmp_path, capsys):
    two = tmp_path / "two-nodes.yaml"
    two.write_text(LOCAL_PROFILE.read_text().replace("\nnodes: 1", "\nnodes: 2"))
    argv = [
        "--config",
        SYNC,
        "--cluster",
        str(two),
        "--wait",
        f"run.root={tmp_path}",
        "run.id=ddp",
        *TINY,
    ]
    assert load_cli().main(argv) == 0, capsys.readouterr().out
    run_dir = tmp_path / "sync" / "ddp"
    events = read_events(run_dir)
    starts = [e for e in events if e["event"] == "start"]
    ends = [e for e in events if e["event"] == "end"]
    assert sorted(e["rank"] for e in starts) == [0, 1]
    assert {e["slurm"]["nodelist"] for e in starts} == {"node[1-2]"}
    assert sorted(e["rank"] for e in ends) == [0, 1] and {e["world_size"] for e in ends} == {2}
    assert ends[0]["metrics"]["val/acc"] == ends[1]["metrics"]["val/acc"]  # one model, all-reduced
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["num_nodes"] == 2 and config["trainer"]["strategy"] == "ddp"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == 15 and result["test/acc"] > 0.5
    assert len(list((run_dir / "logs").glob("*_log.out"))) == 2  # one log per rank


def test_requeue_resumes_from_last_checkpoint_with_the_same_final_metrics(cluster, tmp_path):
    """Preempt one of two identical runs with submitit's signal; it must requeue, resume from
    last.ckpt (not from scratch) and end exactly like the uninterrupted one."""
    common = [
        f"run.root={tmp_path}",
        "trainer.max_epochs=8",
        "run.checkpoint_every_n_steps=7",
        "logger.wandb.mode=offline",
        "trainer.log_every_n_steps=11",
    ]
    jobs = [
        single_job(SYNC, common + [f"run.id={key}"], cluster.config_overrides)
        for key in ("whole", "cut")
    ]
    jobs = submit.prepare(jobs, cluster, "requeue")
    whole, cut = submit.submit(jobs, cluster, "requeue")
    ckpt = jobs[1].run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 180
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), "no periodic checkpoint within 180 s"
    subprocess.run(["scancel", "--signal=USR2", cut.job_id], check=True)  # what submitit handles
    seen: dict = {}
    rows = wait_for([(j.key, j.run_dir) for j in jobs], timeout=400, seen=seen)
    finished(rows)

    # A requeue looks like one: no error event, no error.txt at any time, never FAILED or LOST.
    events = read_events(jobs[1].run_dir)
    kinds = [e["event"] for e in events if "rank" in e]  # the task's events (run_fit logs others)
    assert kinds == ["start", "requeue", "start", "end"], kinds
    assert ERROR not in seen, seen
    assert seen["cut"] <= status.ACTIVE | {"FINISHED"}, seen
    restart = events[2]
    assert restart["slurm"].get("restart_count") == "1"  # requeued by Slurm, same job id
    assert restart["slurm"]["job"] == cut.job_id
    assert restart["resume_step"] and restart["resume_step"] >= 7  # from last.ckpt, not scratch
    out = "".join(Path(p).read_text() for p in status.last_submission(jobs[1].run_dir)["stdout"])
    assert "Requeued job" in out

    results = [json.loads((j.run_dir / "result.json").read_text()) for j in jobs]
    drop = [k for k in results[0] if k.startswith(("time/", "mem/"))]  # machine-dependent only
    expected, got = ({k: v for k, v in r.items() if k not in drop} for r in results)
    assert got == expected


def test_requeue_under_two_node_ddp_records_no_error(cluster, tmp_path):
    """Under DDP the requeue ends rank 1 by Slurm's SIGTERM and a collective whose peer (rank 0,
    gone by submitit's exit) closed the connection: still a requeue, not a failure."""
    two = tmp_path / "two-nodes.yaml"
    two.write_text(LOCAL_PROFILE.read_text().replace("\nnodes: 1", "\nnodes: 2"))
    profile = profiles.load_profile(two)
    overrides = [
        f"run.root={tmp_path}",
        "run.id=cut",
        "trainer.max_epochs=6",
        "run.checkpoint_every_n_steps=7",
        "trainer.log_every_n_steps=11",
        "logger.wandb.mode=offline",
    ]
    jobs = submit.prepare([single_job(SYNC, overrides, profile.config_overrides)], profile, "ddp")
    (sjob,) = submit.submit(jobs, profile, "ddp")
    run_dir = jobs[0].run_dir
    deadline = time.time() + 180
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (run_dir / "checkpoints" / "last.ckpt").exists(), "no periodic checkpoint in 180 s"
    subprocess.run(["scancel", "--signal=USR2", sjob.job_id], check=True)
    seen: dict = {}
    finished(wait_for([("cut", run_dir)], timeout=400, seen=seen))

    events = [e for e in read_events(run_dir) if "rank" in e]
    by_rank = {r: [e["event"] for e in events if e["rank"] == r] for r in (0, 1)}
    assert by_rank == {0: ["start", "requeue", "start", "end"], 1: ["start", "start", "end"]}
    assert ERROR not in seen, seen  # no error.txt, not even between the requeue and the restart
    assert seen["cut"] <= status.ACTIVE | {"FINISHED"}, seen
    logs = "".join(Path(p).read_text() for p in status.last_submission(run_dir)["stderr"])
    assert "Submitted job triggered an exception" not in logs  # no rank ended by a traceback
    restart = [e for e in events if e["event"] == "start" and e["rank"] == 0][1]
    assert restart["slurm"]["restart_count"] == "1" and restart["resume_step"] > 0  # not scratch
