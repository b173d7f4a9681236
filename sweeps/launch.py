#!/usr/bin/env python
"""`python sweeps/launch.py ...`: the launcher, `mach-launch`, run from a checkout.

The launcher lives in mach_lightning/launch/cli.py (installed as `mach-launch`); this file keeps
the README's `python sweeps/launch.py` commands working. See `python sweeps/launch.py --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This checkout's package wins over another installed copy, as when this file held the launcher.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mach_lightning.launch import cli  # noqa: E402


def main(argv=None) -> int:
    return cli.main(argv, prog="python sweeps/launch.py")


if __name__ == "__main__":
    sys.exit(main())
