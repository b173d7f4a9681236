"""bench/embed_report.py: RESULTS.md quotes the report's own tables, refilled in place."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from .conftest import REPO

SCRIPT = REPO / "bench" / "embed_report.py"
spec = importlib.util.spec_from_file_location("embed_report", SCRIPT)
embed_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(embed_report)

REPORT = "# Comparison report: x\n\n## mnist K=4\n\n| a |\n|---|\n| 1 |\n\n![acc](t1.png)\n"


def test_the_block_between_markers_is_replaced_and_the_rest_kept(tmp_path):
    (tmp_path / "rep").mkdir()
    report = tmp_path / "rep" / "report.md"
    report.write_text(REPORT)
    target = tmp_path / "RESULTS.md"
    target.write_text("# R\n\nprose\n\n<!-- report: rep -->\nstale\n<!-- end report -->\n\n## B\n")
    for _ in range(2):  # a second fill replaces the first
        embed_report.embed(report, target)
    text = target.read_text()
    assert "stale" not in text and text.count("<!-- report: rep -->") == 1
    assert "## Comparison report: x" in text and "### mnist K=4" in text
    assert "![acc](rep/t1.png)" in text  # relative to RESULTS.md now
    assert text.startswith("# R\n\nprose\n") and text.endswith("<!-- end report -->\n\n## B\n")


def test_a_file_without_markers_is_refused_and_left_alone(tmp_path):
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.md").write_text(REPORT)
    target = tmp_path / "RESULTS.md"
    target.write_text("# R\n")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "rep" / "report.md"), str(target)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "<!-- report: rep -->" in proc.stderr and "Traceback" not in proc.stderr
    assert target.read_text() == "# R\n"
