"""Copy a report's tables and figures into a markdown file, between two marker lines.

bench/RESULTS.md quotes `python -m mach_lightning.report` rather than numbers typed by hand:

    python bench/embed_report.py bench/report_mnist/report.md bench/RESULTS.md

replaces everything between `<!-- report: report_mnist -->` and `<!-- end report -->` in
RESULTS.md with report.md, its headings one level deeper and its image links made relative to
RESULTS.md. The rest of the file (prose, other benchmarks) is left as it is.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

END = "<!-- end report -->"


def nested(report: Path, target: Path) -> str:
    """report.md's text, headings demoted one level, image paths relative to target's folder."""
    prefix = Path(os.path.relpath(report.parent, target.parent)).as_posix()
    text = report.read_text()
    text = re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)
    text = re.sub(r"\]\((?!https?:|/)([^)]+)\)", lambda m: f"]({prefix}/{m.group(1)})", text)
    return text.strip()


def embed(report: Path, target: Path) -> None:
    begin = f"<!-- report: {report.parent.name} -->"
    text = target.read_text()
    if begin not in text or END not in text.split(begin, 1)[1]:
        sys.exit(
            f"error: {target} has no block to fill: add a line `{begin}` and, below it, a line "
            f"`{END}` where the report's tables should go."
        )
    head, rest = text.split(begin, 1)
    tail = rest.split(END, 1)[1]
    target.write_text(f"{head}{begin}\n{nested(report, target)}\n{END}{tail}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("report", type=Path, help="a report.md written by mach_lightning.report")
    p.add_argument("target", type=Path, help="the markdown file holding the marker lines")
    args = p.parse_args()
    for path in (args.report, args.target):
        if not path.is_file():
            sys.exit(f"error: {path} does not exist")
    embed(args.report, args.target)
    print(f"{args.target}: tables and figures from {args.report}")


if __name__ == "__main__":
    main()
