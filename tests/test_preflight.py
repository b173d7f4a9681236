"""Before anything is submitted the launcher checks what the jobs need besides a valid config:
their data files (never downloading), a writable run root, and that a run a job would resume was
trained with the same settings. A problem stops the whole sweep, naming the jobs and the fix."""

from __future__ import annotations

import shlex

import pytest
from omegaconf import OmegaConf

from mach_lightning.config import load_config
from mach_lightning.launch import profiles, submit
from mach_lightning.launch.sweep import SweepError, expand_sweep

from .conftest import REPO
from .test_launch import load_cli, write_sweep

IDX_FILES = ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def readme_local_sweep() -> list[str]:
    """The arguments of the README's `--cluster local` sweep command (Running on Slurm)."""
    section = (REPO / "README.md").read_text().split("## Running on Slurm", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    (line,) = [ln for ln in block.splitlines() if "--sweep" in ln and "--cluster local" in ln]
    words = shlex.split(line.split("#", 1)[0])
    assert words[:2] == ["python", "sweeps/launch.py"], line
    return words[2:]


@pytest.fixture
def no_submission(monkeypatch):
    monkeypatch.setattr(submit, "submit", lambda *a, **k: pytest.fail("submitted anyway"))


def test_the_readme_local_sweep_passes_the_preflight(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # as a newcomer runs it: from the checkout, nothing downloaded
    argv = readme_local_sweep() + ["--dry-run", f"run.root={tmp_path / 'runs'}"]
    code = load_cli().main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "24 job(s)" in out and "nothing submitted" in out


def test_a_sweep_whose_data_is_missing_is_refused_before_submission(
    tmp_path, capsys, no_submission
):
    sweep = write_sweep(tmp_path, "grid: {data.name: [digits, mnist]}\nseeds: [0, 1]\n")
    empty = tmp_path / "no-data"
    argv = ["--sweep", str(sweep), "--cluster", "local", f"run.root={tmp_path / 'runs'}"]
    code = load_cli().main(argv + [f"data.root={empty}"])
    err = capsys.readouterr().err
    assert code == 2 and "nothing was submitted" in err and "Traceback" not in err, err
    assert "2 of 4 jobs (data-mnist__seed-0, data-mnist__seed-1)" in err, err  # only those
    assert all(name in err for name in IDX_FILES) and f"Put them into {empty}/mnist/" in err
    assert not (tmp_path / "runs").exists() and not empty.exists()  # nothing written, no download


def test_the_same_sweep_passes_with_data_root_pointing_at_the_files(
    mnist_root, tmp_path, capsys, monkeypatch
):
    sweep = write_sweep(tmp_path, "grid: {data.name: [digits, mnist]}\nseeds: [0]\n")
    monkeypatch.chdir(mnist_root.parent)  # data.root relative to where the launcher runs
    argv = ["--sweep", str(sweep), "--cluster", "local", "--dry-run", f"run.root={tmp_path}"]
    assert load_cli().main(argv + [f"data.root={mnist_root.name}"]) == 0, capsys.readouterr()
    # The job reads the folder that was checked, whatever its working directory on the cluster.
    assert f"data.root={mnist_root.resolve()} " in capsys.readouterr().out


def test_a_run_root_that_cannot_be_created_is_refused(tmp_path, capsys, no_submission):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    sweep = write_sweep(tmp_path, "seeds: [0]\n")
    argv = ["--sweep", str(sweep), "--cluster", "local", f"run.root={blocker / 'runs'}"]
    assert load_cli().main(argv) == 2
    err = capsys.readouterr().err
    assert f"{blocker} is not a folder" in err and "run.root" in err, err


def prepared(tmp_path, *extra: str):
    sweep = write_sweep(tmp_path, "grid: {optim.lr: [0.002, 0.003]}\nbaseline: null\n")
    _, jobs = expand_sweep(sweep, [f"run.root={tmp_path / 'runs'}", *extra])
    return jobs


def leave_checkpoint(job, *settings: str) -> None:
    """A run directory as an interrupted run trained with `settings` leaves it."""
    cfg = load_config(job.config, job.overrides + list(settings))
    (job.run_dir / "checkpoints").mkdir(parents=True)
    (job.run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (job.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def test_resuming_a_run_trained_with_other_settings_is_refused_before_submission(tmp_path):
    profile = profiles.load_profile("local")
    first = submit.prepare(prepared(tmp_path), profile, "tiny")
    leave_checkpoint(first[1], "model.num_components=3")  # the sweep file was edited since
    leave_checkpoint(first[0], "trainer.max_epochs=1")  # a budget change: applied, not refused
    with pytest.raises(SweepError) as err:
        submit.prepare(prepared(tmp_path), profile, "tiny")
    msg = str(err.value)
    assert "job 'lr-0.003__seed-0' cannot resume" in msg and "model.num_components" in msg
    assert "lr-0.002" not in msg and "nothing was submitted" in msg
    (first[1].run_dir / "result.json").write_text("{}")  # finished: a relaunch skips it
    assert len(submit.prepare(prepared(tmp_path), profile, "tiny")) == 2
