"""`python -m mach_lightning.report`: numbers checked by hand on synthetic run directories,
problems listed apart, figures, HTML rendered in headless Chromium, the W&B Report object."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mach_lightning.report import compare, load_local
from mach_lightning.report.__main__ import main
from mach_lightning.report.load import resolve_targets
from mach_lightning.report.stats import paired_diff, t_quantile
from mach_lightning.report.wandb_io import load_wandb

T_975_DF2 = 4.302652729749464  # Student t, 97.5% quantile, 2 degrees of freedom (tables)
CHROMIUM_FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run "
    "--disable-background-networking --disable-component-update --disable-sync"
).split()
CONFIG = """name: sw
seed: {seed}
topology: {{name: {topology}}}
data: {{name: digits, root: /data}}
model: {{backbone: mlp, num_components: 2, width: {width}}}
optim: {{lr: 0.001}}
trainer: {{max_steps: 30}}
staleness: {{schedule: {schedule}, k: {k}}}
logger: {{wandb: {{enabled: true, project: p}}}}
"""
DEFAULTS = dict(val=(0.5, 0.8, 0.9), sim_rate=0.01, k=1, schedule="pipeline", width=32)
DEFAULTS.update(loss=1.0, cos=(), finished=True, peak=100.0, components=())


def write_run(root: Path, topology: str, seed: int, test_acc, **spec) -> Path:
    """A run directory with known numbers: val/acc at steps 10, 20, 30, sim time step * rate,
    step time alternating 2 and 4 ms, gradient cosines `cos` minus 0.01 per logged step."""
    s = {**DEFAULTS, **spec}
    run = root / "sw" / f"{topology}-k{s['k']}-w{s['width']}-seed{seed}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(CONFIG.format(topology=topology, seed=seed, **s))
    rows = []
    for i, step in enumerate((10, 20, 30)):
        row = {"step": step, "train/loss": s["loss"], "time/step_ms": (2.0, 4.0)[i % 2]}
        row.update({"time/sim_elapsed_s": step * s["sim_rate"], "time/sim_step_ms": 5.0})
        row.update({f"diag/cos_c{c}": value - 0.01 * i for c, value in enumerate(s["cos"])})
        rows += [row, {"step": step, "epoch": i, "val/acc": s["val"][i], "val/loss": 0.5}]
    if s["finished"]:
        rows.append({"step": 30, "test/acc": test_acc, "test/loss": 0.4})
        result = {"test/acc": test_acc, "mem/peak_mb": s["peak"], "train/loss": s["loss"]}
        result.update({f"test/acc_c{i}": acc for i, acc in enumerate(s["components"])})
        (run / "result.json").write_text(json.dumps(result))
    with open(run / "metrics.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=sorted({k for r in rows for k in r}), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return run


@pytest.fixture
def synthetic(tmp_path) -> Path:
    """sync and delayed (k=2, k=4) x seeds 0-2 on one model; plus one diverged run, one still
    running, and two `local` runs on another width (one seed has a sync run elsewhere)."""
    root = tmp_path / "runs"
    delayed = dict(sim_rate=0.005, schedule="constant", peak=200)
    tests = zip([0.90, 0.92, 0.94], [0.88, 0.91, 0.92], [0.91, 0.90, 0.95])
    for seed, (base, k2, k4) in enumerate(tests):
        write_run(root, "sync", seed, base, val=(0.5, 0.895, 0.90), peak=100 + 10 * seed)
        write_run(root, "delayed", seed, k2, val=(0.4, 0.8, 0.892), k=2, cos=(0.9, 0.7), **delayed)
        val = (0.4, 0.7, 0.85 if seed == 2 else 0.95)
        write_run(root, "delayed", seed, k4, val=val, k=4, cos=(0.8, 0.5), **delayed)
    write_run(root, "delayed", 0, 0.1, k=8, schedule="constant", loss=float("nan"))
    write_run(root, "delayed", 3, None, k=2, schedule="constant", finished=False)
    write_run(root, "local", 0, 0.85, width=64)
    write_run(root, "local", 7, 0.86, width=64)
    return root


def rows_by_label(comp):
    return {row.label: row for table in comp.tables for row in table.rows}


def test_t_quantile_matches_tables():
    for df, expected in [
        (1, 12.7062047),
        (2, 4.3026527),
        (4, 2.7764451),
        (10, 2.2281389),
        (30, 2.0422725),
    ]:
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)
    diff = paired_diff({0: 1.0, 1: 3.0, 2: 2.0}, {0: 0.0, 1: 1.0, 2: 1.0, 9: 5.0})
    mean = (1.0 + 2.0 + 1.0) / 3
    sd = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (1 - mean) ** 2) / 2)
    assert (diff.n, diff.seeds) == (3, (0, 1, 2))
    assert diff.lo == pytest.approx(mean - T_975_DF2 * sd / math.sqrt(3))


def test_table_numbers_equal_hand_computed_values(synthetic):
    runs, _ = load_local(["sw"], synthetic)
    rows = rows_by_label(compare(runs))
    sync, k2, k4 = rows["sync"], rows["delayed, k=2"], rows["delayed, k=4"]
    # sync final test accuracy 0.90, 0.92, 0.94: mean 0.92, sample std 0.02
    assert sync.cells["final_test"].mean == pytest.approx(0.92)
    assert sync.cells["final_test"].std == pytest.approx(0.02)
    mean_k2 = (0.88 + 0.91 + 0.92) / 3
    std_k2 = math.sqrt(((0.88 - mean_k2) ** 2 + (0.91 - mean_k2) ** 2 + (0.92 - mean_k2) ** 2) / 2)
    assert k2.cells["final_test"].mean == pytest.approx(mean_k2)
    assert k2.cells["final_test"].std == pytest.approx(std_k2)
    # paired by seed: d = (0.88 - 0.90, 0.91 - 0.92, 0.92 - 0.94)
    d = (-0.02, -0.01, -0.02)
    d_mean = sum(d) / 3
    d_sd = math.sqrt(sum((x - d_mean) ** 2 for x in d) / 2)
    half = T_975_DF2 * d_sd / math.sqrt(3)
    delta = k2.deltas["delta_final_test"]
    assert (delta.n, delta.mean) == (3, pytest.approx(d_mean))
    assert (delta.lo, delta.hi) == (pytest.approx(d_mean - half), pytest.approx(d_mean + half))
    assert delta.hi < 0 and k2.marked  # -1.67 [-3.10, -0.23]: excludes zero
    # k=4: d = (0.01, -0.02, 0.01), mean 0, sd sqrt(3e-4): [-4.30, +4.30] includes zero
    delta4 = k4.deltas["delta_final_test"]
    half4 = T_975_DF2 * math.sqrt((0.01**2 + 0.02**2 + 0.01**2) / 2) / math.sqrt(3)
    assert (delta4.lo, delta4.hi) == (pytest.approx(-half4), pytest.approx(half4))
    assert not delta4.excludes_zero and not k4.marked
    # best val: 0.892 vs 0.90 in every seed
    assert k2.deltas["delta_best_val"].mean == pytest.approx(0.892 - 0.90)
    # target 0.99 * 0.90 = 0.891: sync reaches it at step 20 (sim 20 * 0.01 s), k=2 at 30
    # (sim 30 * 0.005 s), k=4 at 30 in seeds 0 and 1 only
    assert sync.target == pytest.approx(0.99 * 0.90)
    assert sync.cells["steps_to_target"].mean == 20 and sync.reached == 3
    assert sync.cells["sim_to_target"].mean == pytest.approx(0.2)
    assert k2.cells["steps_to_target"].mean == 30
    assert k2.cells["sim_to_target"].mean == pytest.approx(0.15)
    assert (k4.reached, k4.cells["steps_to_target"].n) == (2, 2)
    assert sync.cells["step_ms"].mean == pytest.approx((2.0 + 4.0 + 2.0) / 3)
    assert sync.cells["peak_mb"].mean == pytest.approx((100 + 110 + 120) / 3)


def test_markdown_shows_the_same_numbers(synthetic, tmp_path):
    assert main(["sw", "--run-root", str(synthetic), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| delayed, k=2 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:3] == ["delayed, k=2", "3 (+1 excluded)", "90.33 ± 2.08"]
    assert cells[3] == "-1.67 [-3.10, -0.23] ◆"  # the difference, marked: excludes zero
    assert "| sync | 3 | 92.00 ± 2.00 | baseline |" in md
    assert "+0.00 [-4.30, +4.30] |" in md  # k=4: not marked
    assert "30 ± 0 (2/3)" in md
    assert "reaching 99% of the matched sync baseline's final val acc = 89.10%" in md


def test_each_components_own_accuracy_is_summarised_over_seeds(tmp_path):
    root = tmp_path / "runs"
    for seed, comps in enumerate([(0.97, 0.99), (0.95, 0.98), (0.96, 0.94)]):
        write_run(root, "sync", seed, 0.99)
        write_run(root, "mach_seq", seed, 0.98, components=comps)
    assert main(["sw", "--run-root", str(root), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    # c0: 0.97, 0.95, 0.96 -> 96.00 ± 1.00; c1: 99, 98, 94 -> 97.00 ± 2.65;
    # the worst component per seed: 0.97, 0.95, 0.94 -> 95.33 ± 1.53
    assert "| c0 96.00 ± 1.00 · c1 97.00 ± 2.65 (min 95.33 ± 1.53) |" in md
    sync_line = next(ln for ln in md.splitlines() if ln.startswith("| sync |"))
    assert "| 99.00 ± 0.00 | — |" in sync_line  # sync has no per-component accuracy


def test_problems_are_listed_apart_and_never_averaged(synthetic):
    runs, _ = load_local(["sw"], synthetic)
    comp = compare(runs)
    kinds = {p.kind: p for p in comp.problems}
    assert set(kinds) == {"diverged", "in progress", "baseline mismatch", "missing baseline"}
    assert kinds["diverged"].run.endswith("delayed-k8-w32-seed0")
    assert "train/loss" in kinds["diverged"].detail
    assert kinds["in progress"].run.endswith("delayed-k2-w32-seed3")
    # the mismatched baseline is refused: named, and no difference is computed
    assert kinds["baseline mismatch"].run.endswith("local-k1-w64-seed0")
    assert "model.width (64 vs 32)" in kinds["baseline mismatch"].detail
    assert kinds["missing baseline"].run.endswith("local-k1-w64-seed7")
    rows = rows_by_label(comp)
    assert rows["delayed, k=2"].excluded == 1 and len(rows["delayed, k=2"].runs) == 3
    assert rows["delayed, k=8"].runs == [] and rows["delayed, k=8"].cells == {}
    assert all(d is None for d in rows["local"].deltas.values()) and rows["local"].target is None
    titles = ["digits · mlp K=2, width=32", "digits · mlp K=2, width=64"]
    assert [t.title for t in comp.tables] == titles


def test_unreadable_run_files_are_problems_and_never_stop_the_report(synthetic, tmp_path, capsys):
    """A result.json or config.yaml cut short (a full disk, a copy interrupted) and an empty
    config.yaml of a finished run: each run is left out and named under Problems, with the file
    and the fault; the other runs' numbers are unchanged."""
    delayed = dict(k=2, schedule="constant", sim_rate=0.005)
    cut = write_run(synthetic, "delayed", 5, 0.93, **delayed)
    text = (cut / "result.json").read_text()
    (cut / "result.json").write_text(text[: len(text) // 2])
    bad_yaml = write_run(synthetic, "sync", 6, 0.9)
    config = (bad_yaml / "config.yaml").read_text()
    (bad_yaml / "config.yaml").write_text(config[: config.index("num_components")])
    empty = write_run(synthetic, "sync", 7, 0.9)  # finished: a valid result.json
    (empty / "config.yaml").write_text("")
    never = synthetic / "sw" / "delayed-seed9"  # submitted; its launch.json cut short
    never.mkdir()
    (never / "launch.json").write_text('{"key": "delayed-seed9", "submissions": [{"job_')

    out = tmp_path / "out"
    assert main(["sw", "--run-root", str(synthetic), "--out", str(out)]) == 0
    assert "4 unreadable" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    section = md.split("### unreadable (4)", 1)[1].split("###", 1)[0]
    lines = {ln.split("|")[1].strip(): ln for ln in section.splitlines() if ln.startswith("| /")}
    assert "result.json: not valid JSON (cut short?)" in lines[str(cut)]
    assert "| delayed, k=2 |" in lines[str(cut)]  # its settings were readable: its row is named
    assert "config.yaml: not valid YAML (cut short?)" in lines[str(bad_yaml)]
    assert "config.yaml: empty" in lines[str(empty)] and "the run finished" in lines[str(empty)]
    assert "launch.json: not valid JSON (cut short?)" in lines[str(never)]
    in_progress = md.split("### in progress (1)", 1)[1].split("###", 1)[0]
    assert "delayed-k2-w32-seed3" in in_progress and str(empty) not in in_progress
    assert "| sync | 3 | 92.00 ± 2.00 | baseline |" in md  # the readable runs, as before
    assert "| delayed, k=2 | 3 (+2 excluded) | 90.33 ± 2.08 |" in md


def test_unfinished_sweep_runs_take_the_launchers_state(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "sync", 0, 0.9)
    run = write_run(root, "delayed", 0, None, finished=False)
    (run / "error.txt").write_text("Traceback ...\nRuntimeError: boom\n")
    submission = {"job_id": "999999999", "executor": "local", "stderr": []}
    (run / "launch.json").write_text(json.dumps({"submissions": [submission]}))
    never_started = root / "sw" / "delayed-seed1"  # submitted: launch.json and logs/ only
    (never_started / "logs").mkdir(parents=True)
    submission = {"job_id": "999999998", "executor": "local", "stderr": []}
    (never_started / "launch.json").write_text(json.dumps({"submissions": [submission]}))
    runs, _ = load_local([str(root)])
    lost, failed = compare(runs).problems  # sorted by kind, then row label
    assert failed.detail == "failed (job 999999999): RuntimeError: boom"
    assert (lost.kind, lost.run, lost.label) == ("failed", str(never_started), "(not started)")
    assert failed.kind == "failed" and lost.detail.startswith("lost (job 999999998)")


def test_row_labels_name_the_settings_that_vary_in_numeric_order(tmp_path):
    root = tmp_path / "runs"
    for k in (10, 2):
        write_run(root, "delayed", 0, 0.9, k=k, schedule="constant")
    write_run(root, "delayed", 0, 0.9, k=1, schedule="pipeline")  # k is not read by pipeline
    runs, _ = load_local([str(root)])
    labels = [row.label for row in compare(runs).tables[0].rows]
    assert labels == [
        "delayed, schedule=constant, k=2",
        "delayed, schedule=constant, k=10",
        "delayed, schedule=pipeline",
    ]


def test_target_acc_and_targets_on_the_command_line(synthetic, tmp_path, capsys):
    runs, _ = load_local(["sw"], synthetic)
    rows = rows_by_label(compare(runs, target_acc=0.94))
    assert rows["delayed, k=4"].reached == 2 and rows["sync"].reached == 0
    assert rows["local"].target == 0.94  # an absolute target needs no baseline
    run_dir = synthetic / "sw" / "sync-k1-w32-seed0"
    (run_dir / "wandb" / "offline-run-x" / "files").mkdir(parents=True)
    (run_dir / "wandb" / "offline-run-x" / "files" / "config.yaml").write_text("a: 1\n")
    dirs, name = resolve_targets([str(synthetic / "sw")], Path("runs"))
    assert len(dirs) == 13 and name == "sw"  # nothing inside wandb/ counts as a run
    assert resolve_targets([str(run_dir)], Path("runs"))[0] == [run_dir.resolve()]
    code = main(["nosuchsweep", "--run-root", str(synthetic)])
    assert code == 2 and "neither a folder nor a sweep" in capsys.readouterr().err


def test_figures_and_html_are_written(synthetic, tmp_path):
    out = tmp_path / "out"
    main(["sw", "--run-root", str(synthetic), "--out", str(out)])
    pngs = sorted(p.name for p in out.glob("*.png"))
    for suffix in ("val-acc-step", "val-acc-simtime", "acc-vs-delay", "grad-cosine"):
        assert any(p.startswith("t1-") and p.endswith(f"{suffix}.png") for p in pngs), suffix
    html = (out / "report.html").read_text()
    assert html.count("<table>") == 2 + 4  # two comparison tables, four problem tables
    assert html.count('src="data:image/png;base64,') == len(pngs)
    assert 'src="t1' not in html  # self-contained: no file references


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    command = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


PROBE = (
    "<script>window.addEventListener('load', () => { for (const img of document.images) "
    "img.setAttribute('data-natural-width', img.naturalWidth); });</script></body>"
)


def check_in_chromium(out: Path, tmp_path: Path, name: str) -> None:
    """Render report.html headless: tables and decoded images in the DOM, a non-blank screenshot
    (saved next to the report, and copied to $ARTIFACTS_DIR when set)."""
    probe = out / "probe.html"
    probe.write_text((out / "report.html").read_text().replace("</body>", PROBE))
    dom = chromium(
        ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp_path / "chrome-dom"
    ).stdout
    images = dom.count("<img")
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert dom.count("<table>") >= 1 and images >= 1
    assert len(widths) == images and min(widths) > 100  # every image decoded
    shot = out / f"{name}.png"
    page = (out / "report.html").as_uri()
    args = ["--window-size=1400,2000", "--hide-scrollbars", f"--screenshot={shot}", page]
    chromium(args, tmp_path / "chrome-shot")
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1400)
    assert (pixels.min(axis=2) < 0.9).mean() > 0.02  # ink: text, table rules, plot lines
    assert len({tuple(p) for p in pixels[::7, ::7].reshape(-1, 3).round(2).tolist()}) > 20
    if os.environ.get("ARTIFACTS_DIR"):
        Path(os.environ["ARTIFACTS_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["ARTIFACTS_DIR"]) / shot.name)


def test_html_renders_in_headless_chromium(synthetic, tmp_path):
    out = tmp_path / "out"
    main(["sw", "--run-root", str(synthetic), "--out", str(out)])
    check_in_chromium(out, tmp_path, "report-synthetic-screenshot")


def test_wandb_report_object_without_a_server(synthetic, monkeypatch):
    pytest.importorskip("wandb_workspaces")
    import wandb_workspaces.reports.v2 as wr

    from mach_lightning.report.wandb_report import build_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    runs, _ = load_local(["sw"], synthetic)
    report = build_report(compare(runs), "sw", entity="team", project="p")
    assert (report.entity, report.project) == ("team", "p")
    assert isinstance(report.blocks[0], wr.H1)
    grids = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    assert len(grids) == 2  # one per table
    names = [rs.name for rs in grids[0].runsets]
    assert names == ["sync baseline", "delayed, k=2", "delayed, k=4"]  # k=8: no usable run
    baseline = grids[0].runsets[0]
    ids = ", ".join(f"'sw-sync-k1-w32-seed{seed}'" for seed in range(3))
    assert baseline.filters == f"ID in [{ids}]"
    assert grids[0].runsets[1].groupby == ["config.topology.name", "config.staleness.k"]
    plots = {p.title: p for p in grids[0].panels if isinstance(p, wr.LinePlot)}
    assert plots["validation accuracy vs batch step"].y == ["val/acc"]
    assert plots["validation accuracy vs batch step"].x == "trainer/global_step"
    assert plots["validation accuracy vs batch step"].groupby_rangefunc == "stddev"
    assert "gradient cosine, component 1" in plots
    assert any(isinstance(p, wr.BarPlot) for p in grids[0].panels)
    markdown = [b.text for b in report.blocks if isinstance(b, wr.MarkdownBlock)]
    assert any("-1.67 [-3.10, -0.23] ◆" in text for text in markdown)
    assert any("model.width (64 vs 32)" in text for text in markdown)  # the problems too


def test_publish_offline_explains_and_writes_the_local_report(
    synthetic, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    out = tmp_path / "out"
    assert main(["sw", "--run-root", str(synthetic), "--out", str(out), "--publish"]) == 0
    printed = capsys.readouterr().out
    assert "cannot create the W&B Report because no W&B API key is configured" in printed
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["sw", "--source", "wandb", "--project", "p"]) == 2
    assert "--source wandb needs the W&B API, but WANDB_MODE=offline" in capsys.readouterr().err


def test_publish_online_saves_the_report_and_prints_its_url(
    synthetic, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("wandb_workspaces")
    import wandb_workspaces.reports.v2 as wr

    from mach_lightning.report import wandb_io

    saved = []
    monkeypatch.setattr(wandb_io, "online", lambda: (True, ""))
    monkeypatch.setattr(wr.Report, "save", lambda self, **kw: saved.append(self) or self)
    url = property(lambda self: f"https://wandb.example/{self.entity}/{self.project}/reports/x")
    monkeypatch.setattr(wr.Report, "url", url)
    args = ["sw", "--run-root", str(synthetic), "--out", str(tmp_path / "o"), "--entity", "team"]
    assert main([*args, "--publish"]) == 0
    assert "W&B Report: https://wandb.example/team/p/reports/x" in capsys.readouterr().out
    assert saved and saved[0].project == "p"  # the runs' logger.wandb.project


class FakeWandbRun:
    def __init__(self, run_id, topology, seed, acc, state="finished", history=None):
        self.id, self.state, self.created_at = run_id, state, "2025-01-01T00:00:00Z"
        self.config = {"seed": seed, "topology": {"name": topology}, "data": {"name": "digits"}}
        self.summary = {"test/acc": acc, "_runtime": 3, "note": "text"}
        self._history = history or [{"_step": 0, "trainer/global_step": 10, "val/acc": acc}]

    def scan_history(self):
        return iter(self._history)


class FakeApi:
    default_entity = "me"

    def __init__(self, runs):
        self._runs = runs
        self.asked = []

    def runs(self, path, filters):
        self.asked.append((path, filters))
        return self._runs


def test_wandb_source_reads_runs_through_the_public_api():
    nan_loss = [{"step": 1, "train/loss": "NaN"}]
    runs = [FakeWandbRun("a0", "sync", 0, 0.9), FakeWandbRun("a1", "sync", 1, 0.8)]
    runs += [FakeWandbRun("b0", "delayed", 0, 0.85), FakeWandbRun("b1", "delayed", 1, 0.70)]
    runs += [FakeWandbRun("c0", "delayed", 2, 0.5, history=nan_loss)]
    api = FakeApi(runs + [FakeWandbRun("d0", "delayed", 3, 0.5, state="running")])
    runs, name = load_wandb(["staleness"], None, "proj", api=api)
    assert api.asked == [("me/proj", {"group": "staleness"})] and name == "staleness"
    assert runs[0].source == "me/proj/a0" and runs[0].wandb_id == "a0"
    assert runs[0].result == {"test/acc": 0.9} and runs[0].series("val/acc") == ([10.0], [0.9])
    comp = compare(runs)
    delayed = rows_by_label(comp)["delayed"]
    expected = ((0.85 - 0.9) + (0.7 - 0.8)) / 2
    assert delayed.deltas["delta_final_test"].mean == pytest.approx(expected)
    assert {p.kind for p in comp.problems} == {"diverged", "in progress"}


@pytest.mark.slow
def test_end_to_end_real_runs_then_report(tmp_path):
    from mach_lightning.config import load_config
    from mach_lightning.fit import run_fit
    from mach_lightning.methods import list_topologies

    from .conftest import tiny_overrides

    others = sorted((t for t in list_topologies() if t != "sync"), key=lambda t: t != "delayed")
    topologies = ["sync"] + others[:1]  # delayed (stale gradients, cosine diagnostics) if there
    started = time.time()
    for topology in topologies:
        for seed in (0, 1):
            extra = f"name=e2e run.id={topology}-seed{seed} topology.name={topology} seed={seed}"
            extra += " model.num_components=2 trainer.max_epochs=3 trainer.limit_train_batches=4"
            extra += " trainer.max_steps=12 diagnostics.cosine_every_n_steps=2"
            run_fit(load_config(None, tiny_overrides(tmp_path, *extra.split())))
    out = tmp_path / "report"
    assert main(["e2e", "--run-root", str(tmp_path / "runs"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| sync | 2 |" in md
    for topology in topologies[1:]:
        assert f"| {topology}" in md
    assert list(out.glob("*-val-acc-step.png"))
    assert (out / "report.html").is_file()
    check_in_chromium(out, tmp_path, "report-e2e-screenshot")
    print(f"end to end: {len(topologies) * 2} runs and the report in {time.time() - started:.0f} s")


def test_run_directories_are_shown_relative_to_the_working_directory(tmp_path, monkeypatch):
    from mach_lightning.report.load import shown

    (tmp_path / "here" / "runs" / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    assert shown(tmp_path / "here" / "runs" / "a") == "runs/a"
    assert shown(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")
