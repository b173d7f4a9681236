"""Which sync run a run is compared with (`mach_lightning/report/keys.py`), checked on run
directories written by hand from real resolved configs; and the README's experiment files, whose
baselines must pair with them as they are."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mach_lightning.config import load_config
from mach_lightning.report import compare, load_local
from mach_lightning.report.__main__ import main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


# What a real run logs besides accuracy: the report's timing and memory columns are filled.
TIMES = {"time/step_ms": 4.0, "time/sim_step_ms": 2.5}


def make_run(root: Path, where: str, seed: int, acc: float, *overrides: str, config=None, **spec):
    """A finished run directory: the resolved config of `config` + overrides, val/acc `val` at
    steps 10, 20, 30 (with TIMES), final test accuracy `acc` (and `components`' own);
    `finished=False` leaves result.json out."""
    cfg = load_config(config, [f"seed={seed}", "logger.wandb.enabled=false", *overrides])
    run = root / where / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    rows = [
        {"step": s, "val/acc": v, "time/sim_elapsed_s": s / 100, **TIMES}
        for s, v in zip((10, 20, 30), spec.get("val", (0.5, 0.8, 0.9)))
    ]
    rows.append({"step": 30, "test/acc": acc})
    with open(run / "metrics.csv", "w", newline="") as file:
        names = sorted({k for r in rows for k in r})
        writer = csv.DictWriter(file, fieldnames=names, restval="")
        writer.writeheader()
        writer.writerows(rows)
    if spec.get("finished", True):
        result = {"test/acc": acc, "status": "finished", "mem/peak_mb": 300.0}
        result.update({f"test/acc_c{i}": a for i, a in enumerate(spec.get("components", ()))})
        (run / "result.json").write_text(json.dumps(result))
    return run


def rows_of(root: Path) -> dict:
    comp = compare(load_local([str(root)])[0])
    return {row.label: row for table in comp.tables for row in table.rows}, comp


def report_md(root: Path, out: Path) -> str:
    assert main([str(root), "--out", str(out)]) == 0
    return (out / "report.md").read_text()


def md_row(md: str, label: str) -> dict[str, str]:
    """The report.md row of this label, as {column title: cell}."""
    header: list[str] = []
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| topology, setting |"):
            header = cells
        elif line.startswith(f"| {label} |"):
            return dict(zip(header, cells))
    raise AssertionError(f"no row {label!r} in report.md")


DELTA = "Δ final vs sync [95% CI]"


def test_a_different_training_budget_means_no_difference_and_the_row_says_why(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        make_run(root, "sync4", seed, 0.90, "trainer.max_epochs=4")
        make_run(root, "delayed", seed, 0.93 + 0.01 * seed, "topology.name=delayed")  # 20 epochs
    rows, comp = rows_of(root)
    delayed = rows["delayed"]
    assert delayed.baseline == {} and all(d is None for d in delayed.deltas.values())
    assert delayed.unpaired == {"baseline differs in trainer.max_epochs (20 vs 4)": [0, 1]}
    assert [p.kind for p in comp.problems] == ["baseline differs"] * 2
    md = report_md(root, tmp_path / "out")
    cells = md_row(md, "delayed")
    assert cells["seeds"] == "2 (2 unpaired)" and cells["final test acc %"] == "93.50 ± 0.71"
    assert cells["vs sync"] == "no Δ: baseline differs in trainer.max_epochs (20 vs 4)"
    assert cells[DELTA] == "—"
    # identical problems are one line, naming both runs
    assert f"| 2 runs: {root}/delayed/{{seed0, seed1}} | delayed | baseline differs" in md

    for seed in (0, 1):  # a sync run of the same budget: the runs are compared with it
        make_run(root, "sync20", seed, 0.92)
    rows, comp = rows_of(root)
    delayed = rows["delayed"]
    assert {s: b.source for s, b in delayed.baseline.items()} == {
        s: str(root / "sync20" / f"seed{s}") for s in (0, 1)
    }
    assert delayed.deltas["delta_final_test"].mean == pytest.approx(0.015)
    assert delayed.unpaired == {} and comp.problems == []
    assert {"sync, trainer.max_epochs=4", "sync, trainer.max_epochs=20"} <= set(rows)


def test_a_budget_difference_in_some_seeds_is_named_with_those_seeds(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1, 2):
        steps = "trainer.max_steps=40" if seed == 2 else "trainer.max_steps=-1"
        make_run(root, "sync", seed, 0.90, steps)
        make_run(root, "local", seed, 0.88, "topology.name=local")
    rows, _ = rows_of(root)
    local = rows["local"]
    assert sorted(local.baseline) == [0, 1] and local.deltas["delta_final_test"].n == 2
    md = report_md(root, tmp_path / "out")
    cells = md_row(md, "local")
    assert cells["seeds"] == "3 (1 unpaired)" and "(n=2)" in cells[DELTA]
    assert cells["vs sync"] == "no Δ for seed 2: baseline differs in trainer.max_steps (-1 vs 40)"


def test_tuning_keys_may_differ_and_the_row_shows_them(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1, 2):
        make_run(root, "sync", seed, 0.90 + 0.01 * seed)
        make_run(
            root, "dni", seed, 0.85, "topology.name=dni", "optim.lr=5e-4", "optim.scheduler=cosine"
        )
    rows, comp = rows_of(root)
    dni = rows["dni"]
    assert dni.deltas["delta_final_test"].n == 3 and comp.problems == []
    assert dni.deltas["delta_final_test"].mean == pytest.approx(0.85 - 0.91)
    assert dni.tuned == ["lr 5e-4 (sync 1e-3), scheduler cosine (sync none)"]
    md = report_md(root, tmp_path / "out")
    cells = md_row(md, "dni")
    assert cells["vs sync"] == "lr 5e-4 (sync 1e-3), scheduler cosine (sync none)"
    assert cells[DELTA].startswith("-6.00 [") and cells[DELTA].endswith("◆")
    assert md_row(md, "sync")["vs sync"] == "—"

    for seed in (0, 1, 2):  # sync runs at dni's own settings: those are preferred, nothing shown
        make_run(root, "sync_tuned", seed, 0.80, "optim.lr=5e-4", "optim.scheduler=cosine")
    dni = rows_of(root)[0]["dni"]
    assert dni.tuned == [] and dni.deltas["delta_final_test"].mean == pytest.approx(0.05)


def test_settings_a_run_does_not_read_never_count(tmp_path):
    """model.channels of an MLP, staleness.* of sync, staleness.k under the pipeline schedule,
    optim.momentum under Adam: none splits a table or a row, or refuses a baseline."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        extra = ["model.channels=[8,16]", "staleness.schedule=constant"] if seed else []
        make_run(root, "sync", seed, 0.90, "optim.momentum=0.5", *extra)
        delayed = [
            "topology.name=delayed",
            "staleness.schedule=pipeline",
            f"staleness.k={seed + 1}",
        ]
        make_run(root, "delayed", seed, 0.91, *delayed)
    rows, comp = rows_of(root)
    assert len(comp.tables) == 1 and set(rows) == {"sync", "delayed"}
    assert sorted(rows["delayed"].baseline) == [0, 1] and rows["delayed"].tuned == []
    md = report_md(root, tmp_path / "out")
    settings = next(ln for ln in md.splitlines() if ln.startswith("Settings:"))
    assert "model.width=512" in settings and "model.channels" not in settings


def test_identical_failures_are_one_line_with_their_count(tmp_path):
    """Same kind, same detail: one line, its runs' shared folder written once (different details
    stay apart: see test_report.py's unreadable runs)."""
    root = tmp_path / "runs"
    make_run(root, "sync", 0, 0.9)
    for seed in (1, 2, 3):
        make_run(root, "delayed", seed, 0.9, "topology.name=delayed", finished=False)
    make_run(root, "local", 4, 0.9, "topology.name=local", finished=False)
    md = report_md(root, tmp_path / "out")
    section = md.split("### in progress (4)", 1)[1].split("##", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    detail = "no result.json yet: still running, or crashed"
    runs = "delayed/seed1, delayed/seed2, delayed/seed3, local/seed4"
    assert lines == [f"| 4 runs: {root}/{{{runs}}} | delayed, local | {detail} |"]


def test_intervals_come_from_scipy_stats(monkeypatch):
    import scipy.stats

    from mach_lightning.report import stats

    diff = stats.paired_diff({0: 1.0, 1: 3.0, 2: 2.0}, {0: 0.0, 1: 1.0, 2: 1.0})
    lo, hi = scipy.stats.t.interval(0.95, 2, loc=diff.mean, scale=diff.std / math.sqrt(3))
    assert (diff.lo, diff.hi) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))

    class FixedT:  # stands in for scipy's distribution: the interval must be computed from it
        @staticmethod
        def ppf(q, df):
            assert (q, df) == (pytest.approx(0.975), 2)
            return 10.0

    monkeypatch.setattr(stats, "student_t", FixedT)
    diff = stats.paired_diff({0: 1.0, 1: 3.0, 2: 2.0}, {0: 0.0, 1: 1.0, 2: 1.0})
    assert diff.hi - diff.mean == pytest.approx(10.0 * diff.std / math.sqrt(3))


def readme_pairs() -> list[tuple[str, str, str]]:
    """(topology, experiment file, baseline file) from the README's topology table."""
    table = README.split("## Topologies", 1)[1].split("\n\n", 2)[1]
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    column = header.index("sync baseline")
    pairs = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        baseline = re.fullmatch(r"`(configs/[\w.]+\.yaml)`", cells[column])
        if baseline:
            config = re.search(r"`(configs/[\w.]+\.yaml)`", line).group(1)
            pairs.append((cells[0].strip("`"), config, baseline.group(1)))
    return pairs


def test_every_readme_experiment_file_pairs_with_its_baseline(tmp_path):
    """Every file of the topology table and the baseline it names, as resolved configs: the
    report compares them (no budget or other difference), showing only tuned learning rates."""
    pairs = readme_pairs()
    assert len(pairs) == 7
    for topology, config, baseline in pairs:
        root = tmp_path / topology
        make_run(root, "base", 0, 0.90, config=REPO / baseline)
        make_run(root, "run", 0, 0.92, config=REPO / config)
        rows, comp = rows_of(root)
        assert len(comp.tables) == 1, f"{config} and {baseline}: {[t.title for t in comp.tables]}"
        row = rows[topology]
        assert row.unpaired == {} and comp.problems == [], f"{config}: {comp.problems}"
        assert row.deltas["delta_final_test"].mean == pytest.approx(0.02)
        expected = ["lr 5e-4 (sync 1e-3)"] if topology in ("dni", "cdni") else []
        assert row.tuned == expected, f"{config} vs {baseline}"


@pytest.mark.slow
def test_readme_report_example_prints_a_real_difference(tmp_path, monkeypatch):
    """The README's example (an experiment file, its baseline, the report), trained for 1 epoch."""
    from mach_lightning.training import run_fit

    block = README.split("## Comparison reports", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln.split("#", 1)[0].split() for ln in block.strip().splitlines()]
    fits = [c for c in commands if c[:3] == ["python", "-m", "mach_lightning.fit"]]
    report = next(c for c in commands if c[:3] == ["python", "-m", "mach_lightning.report"])
    assert len(fits) == 2
    monkeypatch.chdir(tmp_path)
    tiny = ["trainer.max_epochs=1", "logger.wandb.enabled=false", f"run.root={tmp_path / 'runs'}"]
    tiny += ["trainer.progress_bar=false", "trainer.accelerator=cpu", "trainer.devices=1"]
    for words in fits:
        run_fit(load_config(REPO / words[words.index("--config") + 1], tiny))
    assert main([*report[3:], "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    topology = load_config(REPO / fits[1][fits[1].index("--config") + 1]).topology.name
    cells = md_row(md, topology)
    assert re.fullmatch(r"[+-]\d+\.\d\d \(1 seed, no CI\)", cells[DELTA]), cells
    assert "## Problems\n\nNone" in md


def test_real_and_simulated_runs_of_one_config_sit_side_by_side(tmp_path):
    """runtime.* splits rows and never refuses a baseline; a sync run of the same runtime is
    preferred, else the other one is named in the row."""
    root = tmp_path / "runs"
    dist = ("runtime.name=dist", "runtime.mode=free", "topology.name=delayed")
    for seed in (0, 1, 2):
        make_run(root, "sync", seed, 0.90)
        make_run(root, "delayed", seed, 0.88, "topology.name=delayed")
        make_run(root, "delayed_dist", seed, 0.87, *dist, "runtime.timeout_s=5")
    rows, comp = rows_of(root)
    assert comp.problems == []
    sim, real = rows["delayed, runtime.name=sim"], rows["delayed, runtime.name=dist, mode=free"]
    assert sim.deltas["delta_final_test"].mean == pytest.approx(-0.02) and sim.tuned == []
    assert real.deltas["delta_final_test"].mean == pytest.approx(-0.03)
    assert real.tuned == ["runtime dist (sync sim), mode free (sync lockstep)"]
    labels = [row.label for table in comp.tables for row in table.rows]
    assert abs(labels.index(real.label) - labels.index(sim.label)) == 1  # next to each other

    for seed in (0, 1, 2):  # the cross-process sync baseline: preferred by the real runs
        make_run(root, "sync_dist", seed, 0.80, "runtime.name=dist", "runtime.mode=free")
    rows = rows_of(root)[0]
    real = rows["delayed, runtime.name=dist, mode=free"]
    assert real.tuned == [] and real.deltas["delta_final_test"].mean == pytest.approx(0.07)
    assert rows["delayed, runtime.name=sim"].deltas["delta_final_test"].mean == pytest.approx(-0.02)
