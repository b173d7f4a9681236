"""Compare runs against their synchronous baselines: report.md, PNG figures, report.html.

  python -m mach_lightning.report staleness                  # a sweep: runs/staleness/*
  python -m mach_lightning.report sweeps/staleness.yaml      # the same, by its sweep file
  python -m mach_lightning.report runs/sync runs/delayed/20250101-120000 --out reports/mine
  python -m mach_lightning.report staleness --source wandb --entity E --project mach_lightning
  python -m mach_lightning.report staleness --publish        # also a W&B Report, when online

A sweep name means <run root>/<name>/ (where sweeps/launch.py puts its runs); folders are searched
for run directories (config.yaml). With --source wandb the names are W&B groups (a sweep's name).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from mach_lightning.report.compare import compare
from mach_lightning.report.figures import make_figures, slug
from mach_lightning.report.html import write_html
from mach_lightning.report.load import ReportError, load_local
from mach_lightning.report.render import write_markdown


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mach_lightning.report",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    p.add_argument("targets", nargs="+", help="sweep names or files, run directories or folders")
    p.add_argument("--out", type=Path, help="output folder (default: reports/<name>)")
    p.add_argument(
        "--run-root",
        type=Path,
        default=Path("runs"),
        help="where sweep names are looked up (run.root; default: runs)",
    )
    p.add_argument(
        "--source",
        choices=("local", "wandb"),
        default="local",
        help="read run directories (default) or the W&B API",
    )
    p.add_argument("--entity", help="W&B entity (default: the runs' logger.wandb.entity, or yours)")
    p.add_argument("--project", help="W&B project (default: the runs' logger.wandb.project)")
    p.add_argument(
        "--publish",
        action="store_true",
        help="also create a W&B Report (needs an API key and network)",
    )
    p.add_argument(
        "--target-acc",
        type=float,
        help="target validation accuracy for time-to-target (0.97 or 97); default: "
        "--target-frac of the matched baseline's final val acc",
    )
    p.add_argument(
        "--target-frac",
        type=float,
        default=0.99,
        help="fraction of the baseline's final val acc used as target (default 0.99)",
    )
    return p.parse_args(argv)


def _common(runs, key: str) -> str | None:
    values = Counter(r.config.get(key) for r in runs if r.config.get(key))
    return values.most_common(1)[0][0] if values else None


def _publish(comp, name: str, args, out: Path) -> int:
    from mach_lightning.report import wandb_io, wandb_report

    if wandb_report.reports_api() is None:
        print(
            f"--publish: the W&B Reports API is missing ({wandb_report.INSTALL_HINT}); "
            f"the local report is in {out}."
        )
        return 1
    ok, why = wandb_io.online()
    if not ok:
        print(
            f"--publish: cannot create the W&B Report because {why}. The local report was "
            f"written to {out}. To publish: `wandb login` on a machine with network access, "
            "`wandb sync` offline runs, then rerun with --publish."
        )
        return 0
    entity = args.entity or _common(comp.runs, "logger.wandb.entity")
    project = args.project or _common(comp.runs, "logger.wandb.project") or "mach_lightning"
    offline = [r.source for r in comp.runs if list(Path(r.source).glob("wandb/offline-run-*"))]
    if offline:
        print(
            f"note: {len(offline)} runs logged offline; they appear in the W&B Report once "
            "synced: wandb sync <run dir>/wandb/offline-run-*"
        )
    try:
        url = wandb_report.publish(comp, name, entity, project)
    except Exception as err:  # the server's answer; the local report stands regardless
        print(f"--publish: saving the W&B Report failed: {err}. The local report is in {out}.")
        return 1
    print(f"W&B Report: {url}")
    return 0


def load(args) -> tuple[list, str]:
    if args.source == "wandb":
        from mach_lightning.report.wandb_io import load_wandb

        return load_wandb(args.targets, args.entity, args.project or "mach_lightning")
    return load_local(args.targets, args.run_root)


def write_report(runs, name: str, out: Path, target_acc=None, target_frac=0.99):
    """Compare and write report.md, the PNGs and report.html into out; returns the Comparison."""
    comp = compare(runs, target_acc=target_acc, target_frac=target_frac)
    out.mkdir(parents=True, exist_ok=True)
    figures = make_figures(comp, out)
    (out / "report.md").write_text(write_markdown(comp, name, figures))
    (out / "report.html").write_text(write_html(comp, name, out, figures))
    return comp


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = args.target_acc / 100 if args.target_acc and args.target_acc > 1 else args.target_acc
    try:
        runs, name = load(args)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or Path("reports") / slug(name)
    comp = write_report(runs, name, out, target, args.target_frac)
    kinds = Counter(p.kind for p in comp.problems)
    print(
        f"{len(runs)} runs, {len(comp.tables)} table(s): {out / 'report.md'}, {out / 'report.html'}"
    )
    if kinds:
        print("problems (see the report): " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    return _publish(comp, name, args, out) if args.publish else 0


if __name__ == "__main__":
    sys.exit(main())
