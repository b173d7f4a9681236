"""report.html at a laptop's width in headless Chromium: a table wider than the page scrolls in its
own box and the page itself never scrolls sideways."""

from __future__ import annotations

import re

from mach_lightning.report.__main__ import main

from .test_report import chromium
from .test_report_pairing import make_run

WIDTH = 1400
PROBE = (
    "<script>window.addEventListener('load', () => { const b = document.body;"
    " b.setAttribute('data-page', document.documentElement.scrollWidth);"
    " b.setAttribute('data-view', window.innerWidth);"
    " const boxes = [...document.querySelectorAll('table')].map(t => t.parentElement);"
    " b.setAttribute('data-boxes', boxes.filter(e => e.scrollWidth > e.clientWidth).length);"
    " });</script></body>"
)


def wide_report(tmp_path):
    """A K=4 table with every column filled: per-component accuracies, a tuned learning rate,
    long setting labels, a row without a difference and long problem details."""
    root = tmp_path / "runs"
    comps = (0.961, 0.972, 0.983, 0.954)
    for seed in (0, 1, 2):
        make_run(root, "sync", seed, 0.97 + 0.001 * seed, "model.num_components=4")
        for k, mode in ((1, "stash"), (2, "recompute")):
            seq = [
                "topology.name=mach_seq",
                "model.num_components=4",
                "staleness.schedule=constant",
            ]
            seq += [f"staleness.k={k}", f"mach.grad_mode={mode}", "optim.lr=3e-4"]
            make_run(root, f"seq-{k}", seed, 0.96, *seq, components=comps)
        dni = ["topology.name=dni", "model.num_components=4", "optim.lr=5e-4", "synth.lr=0.001"]
        make_run(root, "dni", seed, 0.95, *dni, "optim.scheduler=cosine", "optim.weight_decay=0.01")
        local = ["topology.name=local", "model.num_components=4", "trainer.max_epochs=40"]
        make_run(root, "local-long-budget-variant-with-a-long-name", seed, 0.95, *local)
    out = tmp_path / "out"
    assert main([str(root), "--out", str(out)]) == 0
    return out / "report.html"


def test_wide_tables_scroll_in_their_box_and_the_page_fits_1400px(tmp_path):
    page = wide_report(tmp_path)
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE))
    args = [f"--window-size={WIDTH},900", "--virtual-time-budget=10000", "--dump-dom"]
    dom = chromium([*args, probe.as_uri()], tmp_path / "chrome").stdout
    found = dict(re.findall(r'data-(page|view|boxes)="(\d+)"', dom))
    assert int(found["view"]) == WIDTH
    assert int(found["page"]) <= WIDTH, found  # nothing sticks out of the page
    assert int(found["boxes"]) >= 1, found  # the comparison table is wider: its box scrolls
    shot = page.with_name("shot.png")
    chromium([f"--window-size={WIDTH},900", f"--screenshot={shot}", page.as_uri()], tmp_path / "c2")
    assert shot.is_file()
