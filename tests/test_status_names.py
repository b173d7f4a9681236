"""`sweeps/launch.py --status` takes what `python -m mach_lightning.report` takes: a sweep name
means the run directories under <run.root>/<name>/, found by the report's own resolve_targets."""

from __future__ import annotations

import json
from pathlib import Path

from .test_launch import load_cli


def test_status_takes_a_sweep_name_as_the_report_does(tmp_path, capsys, monkeypatch):
    from mach_lightning.report.load import resolve_targets

    monkeypatch.chdir(tmp_path)  # the default run root, runs/, is relative
    for key in ("lr-0.002__seed-0", "lr-0.003__seed-0"):
        run_dir = tmp_path / "runs" / "tiny" / key
        run_dir.mkdir(parents=True)
        (run_dir / "launch.json").write_text(json.dumps({"submissions": [{"job_id": "7"}]}))
        (run_dir / "result.json").write_text(json.dumps({"test/acc": 0.9, "step": 4}))
    assert len(resolve_targets(["tiny"], Path("runs"))[0]) == 2  # what the report reads
    assert load_cli().main(["--status", "tiny"]) == 0
    out = capsys.readouterr().out
    assert out.count("FINISHED") == 2 and "lr-0.003__seed-0" in out, out
    other = tmp_path / "elsewhere"
    (tmp_path / "runs").rename(other)
    assert load_cli().main(["--status", "tiny", f"run.root={other}"]) == 0
    assert capsys.readouterr().out.count("FINISHED") == 2
    assert load_cli().main(["--status", "tiny"]) == 2
    assert "run.root=DIR" in capsys.readouterr().err
