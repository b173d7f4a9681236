"""`fit` end to end on real data: run directories, step counting, resume, reproducibility, CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from mach_lightning.data import create_datamodule
from mach_lightning.fit import ProgressBar, build_trainer, run_fit
from mach_lightning.runs import RunCSVLogger
from mach_lightning.sim import create_topology
from mach_lightning.sim.meter import TrainMeter

from .conftest import fit_cli, tiny_overrides


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def column(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", weights_only=False)
    return ckpt["state_dict"]


def test_run_directory_holds_everything(tiny_cfg):
    result = run_fit(tiny_cfg("name=layout", "model.num_components=3"))
    run_dir = Path(result["run_dir"])
    assert run_dir.parent.name == "layout"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    rows = read_metrics(run_dir)
    for key in ("train/loss", "train/acc", "val/acc", "val/loss", "test/acc", "time/step_ms"):
        assert column(rows, key), f"{key} missing from metrics.csv"
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["test/acc"] == pytest.approx(result["metrics"]["test/acc"])
    assert saved["test/acc"] > 0.8  # two epochs on digits already learn most of it
    assert 0.8 < saved["test_best/acc"] <= 1.0  # the best-by-val/acc checkpoint, tested too
    assert column(rows, "test_best/acc") == [pytest.approx(saved["test_best/acc"])]


def test_last_checkpoint_is_the_end_of_the_run_even_when_it_is_not_the_best(tiny_cfg):
    # monitor_mode=min on val/acc makes epoch 0 the "best": last.ckpt must still be the end.
    result = run_fit(tiny_cfg("trainer.max_epochs=3", "run.monitor_mode=min"))
    ckpt_dir = Path(result["run_dir"]) / "checkpoints"
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert [p.name for p in ckpt_dir.glob("best-*.ckpt")] == ["best-epoch000.ckpt"]
    assert last["topology_state"]["batch_step"] == result["metrics"]["step"] == 33


def test_steps_count_batches_not_optimizer_steps(tiny_cfg):
    # 3 components = 3 optimizer steps per batch; logged steps must still count batches.
    result = run_fit(tiny_cfg("model.num_components=3", "trainer.max_epochs=1"))
    rows = read_metrics(result["run_dir"])
    batches = int(result["metrics"]["step"])
    assert batches == 11  # ceil(1294 training digits / 128)
    assert max(column(rows, "step")) == batches
    train_steps = [float(r["step"]) for r in rows if r.get("train/loss")]
    assert train_steps == [2.0, 4.0, 6.0, 8.0, 10.0]  # every log_every_n_steps=2, each once


def test_max_steps_counts_batches(tiny_cfg):
    result = run_fit(tiny_cfg("model.num_components=3", "trainer.max_steps=5"))
    assert result["metrics"]["step"] == 5


def test_same_seed_gives_identical_metrics(tiny_cfg):
    runs = [run_fit(tiny_cfg("seed=3", f"run.id=r{i}")) for i in range(2)]
    a, b = (read_metrics(r["run_dir"]) for r in runs)
    for key in ("train/loss", "val/acc", "val/loss"):
        assert column(a, key) == column(b, key)
    assert runs[0]["metrics"]["test/acc"] == runs[1]["metrics"]["test/acc"]


def test_other_seed_differs(tiny_cfg):
    a = run_fit(tiny_cfg("seed=1", "trainer.max_epochs=1"))
    b = run_fit(tiny_cfg("seed=2", "trainer.max_epochs=1"))
    assert column(read_metrics(a["run_dir"]), "train/loss") != column(
        read_metrics(b["run_dir"]), "train/loss"
    )


def test_resumed_run_ends_with_the_same_weights(tiny_cfg):
    flags = ("seed=5", "trainer.deterministic=true", "model.num_components=2")
    whole = run_fit(tiny_cfg(*flags, "run.id=whole", "trainer.max_epochs=3"))
    run_fit(tiny_cfg(*flags, "run.id=cut", "trainer.max_epochs=1"))  # "interrupted" after 1
    resumed = run_fit(tiny_cfg(*flags, "run.id=cut", "trainer.max_epochs=3", "resume=true"))
    assert resumed["run_dir"].endswith("cut") and resumed["metrics"]["step"] == 33
    expected, got = final_weights(whole["run_dir"]), final_weights(resumed["run_dir"])
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    steps = column(read_metrics(resumed["run_dir"]), "step")
    assert steps == sorted(steps)  # the CSV continues, no repeated or lost rows


def test_resume_from_explicit_checkpoint(tiny_cfg):
    first = run_fit(tiny_cfg("run.id=src", "trainer.max_epochs=1"))
    ckpt = Path(first["run_dir"]) / "checkpoints" / "last.ckpt"
    resumed = run_fit(tiny_cfg(f"ckpt_path={ckpt}", "trainer.max_epochs=2"))
    assert resumed["run_dir"] == first["run_dir"] and resumed["metrics"]["step"] == 22


def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return fit_cli(*args, env={**os.environ, **(env_extra or {})})


def test_cli_bad_key_stops_before_work(tmp_path):
    proc = _cli("--config", "configs/sync.yaml", "model.widht=3", f"run.root={tmp_path}")
    assert proc.returncode == 2
    assert "Did you mean model.width?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was started


def test_cli_missing_data_says_where_to_put_it(tmp_path):
    empty = tmp_path / "nothing-here"
    proc = _cli(
        "data.name=mnist",
        f"data.root={empty}",
        "data.download=false",
        f"run.root={tmp_path / 'runs'}",
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "train-images-idx3-ubyte.gz" in proc.stderr and str(empty) in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_list_names_topologies_and_datasets():
    proc = _cli("--list")
    assert proc.returncode == 0
    assert "sync" in proc.stdout and "digits" in proc.stdout and "mnist" in proc.stdout


def _wandb_run_without_a_key(tmp_path, **env_extra: str) -> subprocess.CompletedProcess:
    """A 3-step run with W&B on, no API key, no netrc, no prompt possible."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"), **env_extra)
    overrides = tiny_overrides(tmp_path, "trainer.max_steps=3", "trainer.test_after_fit=false")
    overrides = [o for o in overrides if not o.startswith("logger.wandb.enabled")]
    proc = fit_cli(*overrides, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_wandb_goes_offline_without_a_key(tmp_path):
    _wandb_run_without_a_key(tmp_path, WANDB_SILENT="true")
    offline_runs = list((tmp_path / "runs").glob("default/*/wandb/offline-run-*"))
    assert offline_runs, "no offline W&B run was written"
    assert list(offline_runs[0].glob("*.wandb"))  # the run's data, ready for `wandb sync`


def test_offline_wandb_says_one_line_not_its_banner(tmp_path):
    proc = _wandb_run_without_a_key(tmp_path, WANDB_MODE="offline")
    assert "W&B: offline run under" in proc.stdout
    assert "wandb:" not in proc.stdout + proc.stderr  # no banner, no "anonymous" warning


def test_train_meter_sums_in_batches_and_holds_a_bounded_window():
    torch.manual_seed(0)
    meter = TrainMeter(flush_every=3)
    losses, logits, labels = torch.rand(10), torch.randn(10, 16, 5), torch.randint(0, 5, (10, 16))
    for i in range(10):
        meter.update(losses[i], logits[i], labels[i], secs=0.002)
        assert len(meter._logits) < 3  # reduced every 3 steps: memory never grows with the window
    summary = meter.summary()
    assert summary["train/loss"] == pytest.approx(float(losses.mean()), rel=1e-6)
    expected_acc = float((logits.argmax(-1) == labels).float().mean())
    assert summary["train/acc"] == pytest.approx(expected_acc)
    assert summary["time/step_ms"] == pytest.approx(2.0)
    assert summary["time/samples_per_s"] == pytest.approx(160 / 0.02)


def test_csv_rows_reach_the_file_first_then_by_the_clock_and_on_save(tmp_path):
    logger = RunCSVLogger(tmp_path, flush_every_s=3600)
    logger.log_metrics({"train/loss": 1.0}, step=1)
    assert column(read_metrics(tmp_path), "train/loss") == [1.0]  # the first row at once
    logger.log_metrics({"train/loss": 0.5}, step=2)
    assert column(read_metrics(tmp_path), "train/loss") == [1.0]  # within the hour: buffered
    logger.save()  # what last.ckpt saves and the end of a run (or a crash) call
    assert column(read_metrics(tmp_path), "train/loss") == [1.0, 0.5]


class CountingBar(ProgressBar):
    def __init__(self, interval_s: float):
        super().__init__(interval_s)
        self.redraws = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        before = self.train_progress_bar.n
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.train_progress_bar.n != before:
            self.redraws.append(self.train_progress_bar.n)


def test_progress_bar_redraws_by_the_clock_and_always_at_the_epoch_end(tiny_cfg):
    cfg = tiny_cfg("trainer.progress_bar=true")
    datamodule = create_datamodule(cfg.data, cfg.seed)
    model = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    trainer = build_trainer(cfg, Path(cfg.run.root) / "bar")
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ProgressBar)]
    bar = CountingBar(interval_s=3600)
    trainer.callbacks.append(bar)
    trainer.fit(model, datamodule=datamodule)
    assert bar.redraws == [1, 11, 11]  # the very first batch, then each epoch's last (of 11)
