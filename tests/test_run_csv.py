"""runs.RunCSVLogger, a public `Logger` writing metrics.csv itself: the bytes Lightning's own
CSVLogger writes, appending across resumes, and rows on disk by the clock and on every save."""

from __future__ import annotations

import csv
import types
from pathlib import Path

import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from mach_lightning import runs
from mach_lightning.runs import RunCSVLogger, csv_rows, truncate_metrics

# (metrics, step, save after it): tensors, ints and floats; a step left to the logger; keys
# appearing mid-way, both alone (a rewrite of the file) and within a batch of pending rows.
CALLS = [
    ({"train/loss": torch.tensor(1.25), "epoch": 0}, 1, True),
    ({"train/loss": 0.5, "epoch": 0}, 2, False),
    ({"train/loss": 1 / 3, "epoch": 0}, 3, True),
    ({"val/acc": 0.75, "val/loss": torch.tensor(0.1, dtype=torch.float64)}, 3, True),
    ({"train/loss": 0.25, "epoch": 1}, None, False),
    ({"lr-SGD": 0.01}, 4, False),
    ({"train/loss": 1e-9, "epoch": 1, "time/step_ms": 12}, 5, True),
    ({"test/acc": 0.875}, 5, True),
]


def lightning_csv(directory: Path, calls=CALLS) -> bytes:
    """What Lightning's CSVLogger writes for `calls`, saving at the same points."""
    logger = CSVLogger(directory, name="", version="", flush_logs_every_n_steps=10**9)
    write(logger, calls)
    logger.finalize("success")
    return (directory / "metrics.csv").read_bytes()


def write(logger, calls) -> None:
    for metrics, step, save in calls:
        logger.log_metrics(dict(metrics), step)
        if save:
            logger.save()


def rows(directory: Path) -> list[dict]:
    with open(directory / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def test_the_file_is_byte_for_byte_lightnings(tmp_path):
    ours = RunCSVLogger(tmp_path / "ours", flush_every_s=3600)
    write(ours, CALLS)
    ours.finalize("success")
    assert (tmp_path / "ours" / "metrics.csv").read_bytes() == lightning_csv(tmp_path / "theirs")


def test_a_save_after_every_log_call_as_the_trainer_does_is_lightnings_too(tmp_path):
    calls = [(metrics, step, True) for metrics, step, _ in CALLS]
    ours = RunCSVLogger(tmp_path / "ours", flush_every_s=3600)
    write(ours, calls)
    ours.finalize("success")
    expected = lightning_csv(tmp_path / "theirs", calls)
    assert (tmp_path / "ours" / "metrics.csv").read_bytes() == expected


def test_hparams_yaml_is_lightnings(tmp_path):
    params = {"config": {"seed": 3, "optim": {"lr": 0.1}}, "input_shape": [1, 8, 8], "k": 2}
    ours, theirs = RunCSVLogger(tmp_path / "ours"), CSVLogger(tmp_path / "theirs", "", "")
    for logger in (ours, theirs):
        logger.log_hyperparams(params)
        logger.log_hyperparams({"num_classes": 10})  # merged with the earlier ones
    expected = (tmp_path / "theirs" / "hparams.yaml").read_bytes()
    assert (tmp_path / "ours" / "hparams.yaml").read_bytes() == expected


def test_a_resumed_run_appends_under_the_files_header(tmp_path):
    first = RunCSVLogger(tmp_path, flush_every_s=3600)
    write(first, CALLS[:5])
    first.finalize("failed")
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    second = RunCSVLogger(tmp_path, flush_every_s=3600)  # the resumed run, same directory
    write(second, [({"train/loss": 0.125, "epoch": 1}, 4, True)])
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == header
    assert [r["train/loss"] for r in rows(tmp_path)][-2:] == ["0.25", "0.125"]
    assert csv_rows(tmp_path) == 6
    write(second, CALLS[5:])  # new columns: the old rows are kept under the new header
    second.finalize("success")
    # the same bytes as one uninterrupted run writing everything
    assert (tmp_path / "metrics.csv").read_bytes() == lightning_csv(
        tmp_path / "whole", CALLS[:5] + [({"train/loss": 0.125, "epoch": 1}, 4, True)] + CALLS[5:]
    )


def test_a_resume_after_truncation_continues_the_cut_file(tmp_path):
    first = RunCSVLogger(tmp_path, flush_every_s=0)  # 0: every row written at once
    write(first, CALLS)
    truncate_metrics(tmp_path, after_step=3)  # what prepare_run_dir does on a resume at step 3
    kept = rows(tmp_path)
    assert [r["step"] for r in kept] == ["1", "2", "3", "3", "0"]  # the logger-counted step
    second = RunCSVLogger(tmp_path, flush_every_s=0)
    write(second, CALLS[4:])
    assert rows(tmp_path)[: len(kept)] == kept
    # the same bytes as one uninterrupted run logging the kept rows, then the resumed ones
    resumed = [(metrics, step, True) for metrics, step, _ in CALLS[:5] + CALLS[4:]]
    expected = lightning_csv(tmp_path / "whole", resumed)
    assert (tmp_path / "metrics.csv").read_bytes() == expected


def test_rows_reach_the_file_first_then_by_the_clock_and_on_save(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(runs, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    logger = RunCSVLogger(tmp_path, flush_every_s=2.0)
    logger.log_metrics({"train/loss": 1.0}, step=1)
    assert csv_rows(tmp_path) == 1  # the first row at once
    now[0] += 1.9
    logger.log_metrics({"train/loss": 0.5}, step=2)
    assert csv_rows(tmp_path) == 1  # within flush_every_s: held
    logger.save()  # last.ckpt's save, or Lightning's after its log call
    assert csv_rows(tmp_path) == 2
    now[0] += 0.1  # 2 s after the first write
    logger.log_metrics({"train/loss": 0.25}, step=3)
    assert csv_rows(tmp_path) == 3
    now[0] += 1.0
    logger.log_metrics({"train/loss": 0.125}, step=4)
    assert csv_rows(tmp_path) == 3
    logger.finalize("success")  # the run's end (or failure) writes the rest
    assert [r["train/loss"] for r in rows(tmp_path)] == ["1.0", "0.5", "0.25", "0.125"]


def test_an_unused_logger_writes_nothing_and_other_ranks_log_nothing(tmp_path, monkeypatch):
    RunCSVLogger(tmp_path / "unused").finalize("success")
    assert not (tmp_path / "unused").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = RunCSVLogger(tmp_path / "rank1")
    logger.log_hyperparams({"a": 1})
    logger.log_metrics({"train/loss": 1.0}, step=1)
    logger.save()
    logger.finalize("success")
    assert not (tmp_path / "rank1").exists()


def test_the_logger_names_the_run_directory(tmp_path):
    logger = RunCSVLogger(tmp_path)
    assert (logger.name, logger.version) == ("", "")
    assert logger.save_dir == logger.log_dir == str(tmp_path)
