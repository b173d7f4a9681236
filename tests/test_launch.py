"""The launcher without a cluster: dry runs, sweep expansion, validation, profiles, status."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mach_lightning.launch import profiles, status, submit
from mach_lightning.launch.sweep import SweepError, expand_sweep

from .conftest import REPO

SYNC = str(REPO / "configs" / "sync.yaml")


def load_cli():
    spec = importlib.util.spec_from_file_location("launch_cli", REPO / "sweeps" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_sweep(tmp_path: Path, text: str, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nconfig: {SYNC}\n" + text)
    return path


def test_dry_run_4x8_profile_prints_the_sbatch_lines(tmp_path, capsys):
    cli = load_cli()
    profile = str(REPO / "slurm" / "example-4x8gpu.yaml")
    code = cli.main(["--config", SYNC, "--cluster", profile, "--dry-run", f"run.root={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --signal=USR2@180",
        "#SBATCH --requeue",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=1440",
        "module load cuda",
    ):
        assert line in out, f"{line!r} missing from the dry run:\n{out}"
    assert "trainer.num_nodes=4" in out and "trainer.devices=8" in out and "resume=true" in out
    assert "srun" in out and "nothing submitted" in out
    assert not any(tmp_path.iterdir()), "a dry run must not create run directories"


def test_dry_run_of_a_sweep_shows_one_job_array(tmp_path, capsys):
    sweep = write_sweep(
        tmp_path,
        "grid: {optim.lr: [0.002, 0.003]}\nseeds: [0, 1]\n"
        "baseline: {overrides: [topology.name=sync], keep: [data., model.]}\n",
    )
    cli = load_cli()
    code = cli.main(
        [
            "--sweep",
            str(sweep),
            "--cluster",
            "example-4x8gpu",
            "--dry-run",
            f"run.root={tmp_path / 'runs'}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --array=0-5%6" in out  # 4 grid jobs + 2 baselines (one per seed)
    assert "baseline__seed-0" in out and "lr-0.003__seed-1" in out
    assert not (tmp_path / "runs").exists()


def test_one_bad_value_stops_the_whole_sweep_before_submission(tmp_path, capsys, monkeypatch):
    sweep = write_sweep(tmp_path, "grid:\n  optim.name: [adam, adamx]\nseeds: [0, 1]\n")
    monkeypatch.setattr(submit, "submit", lambda *a, **k: pytest.fail("submitted a bad sweep"))
    cli = load_cli()
    code = cli.main(["--sweep", str(sweep), "--cluster", "local", f"run.root={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "optim-adamx__seed-0" in err and "optim.name" in err and "nothing was submitted" in err
    assert "job 3 of" in err, err  # names which job
    assert not (tmp_path / "r").exists()


def test_a_semantic_error_names_the_job_and_the_key(tmp_path, capsys):
    sweep = write_sweep(tmp_path, "grid:\n  optim.lr: [0.001, -1.0]\n")
    code = load_cli().main(["--sweep", str(sweep), "--cluster", "local", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "lr--1__seed-0" in err and "optim.lr" in err


@pytest.mark.parametrize(
    "axis, hint",
    [
        ("trainer.strategy: [ddp, dpp]", "Did you mean ddp?"),
        ("trainer.precision: [64-foo]", "64-true"),
    ],
)
def test_a_bad_trainer_value_stops_the_sweep_before_submission(
    tmp_path, capsys, monkeypatch, axis, hint
):
    # Lightning only checks these when the Trainer is built: on the cluster, too late.
    sweep = write_sweep(tmp_path, f"grid:\n  {axis}\n")
    monkeypatch.setattr(submit, "submit", lambda *a, **k: pytest.fail("submitted a bad sweep"))
    code = load_cli().main(
        ["--sweep", str(sweep), "--cluster", "local", f"run.root={tmp_path / 'r'}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "nothing was submitted" in err and "Traceback" not in err
    assert axis.split(":")[0] in err and hint in err and "Valid choices:" in err
    assert not (tmp_path / "r").exists()


def test_overrides_may_come_before_and_between_options(tmp_path, capsys):
    argv = ["seed=1", "--config", SYNC, "optim.lr=0.01", "--cluster", "local", "--dry-run"]
    code = load_cli().main(argv + [f"run.root={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0 and "nothing submitted" in out
    assert f"--config {SYNC} seed=1 optim.lr=0.01 run.root={tmp_path}" in out


def test_sweep_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    sweep = write_sweep(tmp_path, "grid:\n  optim.lr: [0.1, 0.2\nseeds: [0]\n")
    code = load_cli().main(["--sweep", str(sweep), "--cluster", "local", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"Sweep file '{sweep}' is not valid YAML: line 5, column 6" in err
    assert "flow sequence at line 4, column 13" in err  # where the unclosed [ opened


@pytest.mark.parametrize(
    "text, line, expected",
    [
        ("seeds: [a]\n", 3, "seeds must be a list of integers, e.g. seeds: [0, 1, 2]; got ['a']"),
        ("seeds: 3\n", 3, "seeds: [0, 1, 2]"),
        ("overrides: seed=1\n", 3, "overrides: [data.name=mnist"),
        ("random: {samples: 2, axes: {optim.lr: {uniform: [1]}}}\n", 3, "optim.lr: {uniform: ["),
        ("random:\n  axes:\n    optim.lr: {log_uniform: [0, 1]}\n", 5, "0 < low <= high"),
        ("random:\n  axes:\n    optim.name: {choice: []}\n", 5, "choice: [adam, sgd]"),
        ("random:\n  axes:\n    optim.lr: {normal: [0, 1]}\n", 5, "{uniform: [0.0, 0.5]} |"),
        ("random:\n  samples: x\n  axes: {optim.lr: {uniform: [0.1, 0.2]}}\n", 3, "samples: 4"),
        ("random: [1, 2]\n", 3, "random must be a mapping, e.g. random: {samples: 4"),
        ("grid: {optim.lr: 0.1}\n", 3, "needs a non-empty list of values or '*'"),
    ],
)
def test_bad_sweep_values_name_the_line_and_a_valid_form(tmp_path, text, line, expected):
    sweep = write_sweep(tmp_path, text)
    with pytest.raises(SweepError) as err:
        expand_sweep(sweep, [])
    assert f"{sweep}, line {line}: " in str(err.value) and expected in str(err.value)


def test_missing_sweep_file_suggests_the_nearest(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SweepError, match=r"Did you mean sweeps/staleness\.yaml\?.*topologies"):
        expand_sweep("sweeps/stalenes.yaml", [])


def test_grid_random_seeds_and_baselines_expand(tmp_path):
    sweep = write_sweep(
        tmp_path,
        (
            "grid: {model.num_components: [1, 2], topology.name: [sync]}\n"
            "random: {samples: 3, seed: 7, axes: {optim.lr: {log_uniform: [1.0e-4, 1.0e-2]}}}\n"
            "seeds: [0, 1]\nbaseline: sync\n"
        ),
    )
    spec, jobs = expand_sweep(sweep, ["trainer.max_steps=3"])
    grid = [j for j in jobs if not j.baseline]
    assert len(grid) == 2 * 3 * 2 and len({j.key for j in grid}) == len(grid)
    lrs = {o for j in grid for o in j.overrides if o.startswith("optim.lr=")}
    assert len(lrs) == 3 and all(1e-4 <= float(o.split("=")[1]) <= 1e-2 for o in lrs)
    assert expand_sweep(sweep, [])[1][0].overrides == jobs[0].overrides[:-1]  # seeded: repeatable
    baselines = [j for j in jobs if j.baseline]  # keep data., model., optim., trainer. axes
    assert len(baselines) == len(grid) and baselines[0].key.startswith(
        "baseline__num_components-1__lr-"
    )
    assert all("topology.name=sync" in j.overrides and "baseline" in j.tags for j in baselines)
    assert jobs[0].overrides[-1] == "trainer.max_steps=3" and jobs[0].group == "tiny"
    # sync is already in the grid: validation drops the identical baselines
    kept = submit.prepare(jobs, profiles.load_profile("local"), "tiny")
    assert len(kept) == len(grid) and all(j.topology == "sync" for j in kept)


def test_every_registered_topology_with_star(tmp_path):
    from mach_lightning.methods import list_topologies

    sweep = write_sweep(tmp_path, "grid: {topology.name: '*'}\nseeds: [0, 1, 2]\n")
    _, jobs = expand_sweep(sweep, [])
    assert len([j for j in jobs if not j.baseline]) == 3 * len(list_topologies())


@pytest.mark.parametrize("name", ["topologies", "staleness"])
def test_shipped_sweeps_validate(name, tmp_path):
    from mach_lightning.methods import list_topologies

    if name == "staleness" and "delayed" not in list_topologies():
        pytest.skip("sweeps/staleness.yaml needs the `delayed` topology (stale-gradient engine)")
    profile = profiles.load_profile("example-4x8gpu")
    _, jobs = expand_sweep(REPO / "sweeps" / f"{name}.yaml", [f"run.root={tmp_path}"])
    # The configs only: the profile's data.root=/datasets is on that cluster, not here.
    jobs = submit.prepare(jobs, profile, name, check=False)
    assert jobs and all(j.run_dir.parent.name == name for j in jobs)


def test_profile_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: 2\ngpus_per_nodes: 8\n")
    with pytest.raises(profiles.ProfileError, match="gpus_per_nodes"):
        profiles.load_profile(bad)
    bad.write_text("nodes: 2\ntasks_per_node: 4\ngpus_per_node: 8\n")
    with pytest.raises(profiles.ProfileError, match="tasks_per_node=4 but gpus_per_node=8"):
        profiles.load_profile(bad)
    with pytest.raises(profiles.ProfileError, match="example-4x8gpu"):
        profiles.load_profile("example-4x8")


def test_profile_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: 2\npartition: gpu: a100\n")
    with pytest.raises(profiles.ProfileError) as err:
        profiles.load_profile(bad)
    msg = str(err.value)
    assert f"Cluster profile '{bad}' is not valid YAML: line 2, column 15: mapping values" in msg


def test_missing_profile_path_suggests_the_nearest_and_lists_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # repository-relative profile paths work from anywhere
    assert profiles.load_profile("slurm/local.yaml").partition == "debug"
    with pytest.raises(profiles.ProfileError) as err:
        profiles.load_profile("slurm/locl.yaml")
    msg = str(err.value)
    assert "Did you mean slurm/local.yaml?" in msg
    assert "slurm/example-4x8gpu.yaml, slurm/local.yaml" in msg and "`local`" in msg
    code = load_cli().main(["--config", SYNC, "--cluster", "slurm/locl.yaml", "--dry-run"])
    assert code == 2 and "Did you mean slurm/local.yaml?" in capsys.readouterr().err


def test_status_shows_a_failed_jobs_error_and_plans_its_resubmission(tmp_path):
    done, failed, missing = (tmp_path / n for n in ("done", "failed", "missing"))
    for run_dir, job_id in ((done, "7_0"), (failed, "7_1")):
        run_dir.mkdir()
        launch = {"submissions": [{"job_id": job_id, "executor": "slurm", "stderr": []}]}
        (run_dir / "launch.json").write_text(json.dumps(launch))
    (done / "result.json").write_text(json.dumps({"test/acc": 0.97, "step": 40}))
    (failed / "error.txt").write_text("rank 0 (vm):\nTraceback...\nValueError: boom\n")
    rows = status.status_rows(
        [("done", done), ("failed", failed), ("missing", missing)], queue={"7_1": "FAILED"}
    )
    assert [r.state for r in rows] == ["FINISHED", "FAILED", "MISSING"]
    text = status.format_status(rows)
    assert "test/acc=0.9700" in text and "ValueError: boom" in text
    queue = {"7_1": "RUNNING"}
    assert status.status_rows([("failed", failed)], queue=queue)[0].state == "RUNNING"


@pytest.mark.slow
def test_local_executor_runs_a_job_without_slurm(tmp_path, capsys):
    code = load_cli().main(
        [
            "--config",
            SYNC,
            "--cluster",
            "local",
            f"run.root={tmp_path}",
            "run.id=here",
            "trainer.max_steps=5",
            "logger.wandb.enabled=false",
        ]
    )
    out = capsys.readouterr().out
    run_dir = tmp_path / "sync" / "here"
    assert code == 0, out
    assert (run_dir / "result.json").is_file() and "FINISHED" in out
    assert list((run_dir / "logs").glob("*_0_log.out"))
