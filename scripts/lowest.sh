#!/usr/bin/env bash
# CI: the code against the lowest versions pyproject.toml allows. Makes a fresh venv, installs
# every dependency (and the test and publish extras) at its lower bound, read from pyproject.toml
# so that the bounds and this check cannot drift apart, then this package, and runs a fast subset
# of the tests. The venv does not see the system's site-packages: packages installed there for the
# main run would shadow the pins or, needing newer versions of shared dependencies, break them.
#   bash scripts/lowest.sh          # LOWEST_VENV=DIR to choose the venv (default: under /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LOWEST_VENV:-${TMPDIR:-/tmp}/mach_lightning-lowest}
VPY="$VENV/bin/python"
start=$SECONDS
stage() { echo "lowest: [$((SECONDS - start))s] $*"; }

stage "fresh venv in $VENV"
"$PY" -m venv --clear "$VENV"

# name==lower for every requirement; one without a lower bound stops the check. The venv has
# only pip, so pip's own TOML reader (Python 3.10) and requirement parser are used.
READ_PINS='
import sys
try:
    import tomllib
except ImportError:
    from pip._vendor import tomli as tomllib
from pip._vendor.packaging.requirements import Requirement

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for text in [*project["dependencies"], *extras["test"], *extras["publish"]]:
    req = Requirement(text)
    lower = [s.version for s in req.specifier if s.operator == ">="]
    if not lower:
        sys.exit(f"lowest: {text!r} in pyproject.toml has no lower bound (>=)")
    print(f"{req.name}=={lower[0]}")
'
# pip may resolve to other versions than asked; the check is only worth its name if it did not.
CHECK_PINS='
import sys
from importlib.metadata import version
from pip._vendor.packaging.requirements import Requirement

wrong = []
for pin in map(Requirement, sys.argv[1:]):
    got = version(pin.name)
    print(f"  {pin.name:24} {got}")
    if not pin.specifier.contains(got, prereleases=True):
        wrong.append(f"{pin.name} {got} (wanted {pin.specifier})")
if wrong:
    sys.exit("lowest: installed versions differ from the lower bounds: " + ", ".join(wrong))
'
PINS=()
while IFS= read -r pin; do PINS+=("$pin"); done < <("$VPY" -c "$READ_PINS")
[ ${#PINS[@]} -gt 0 ] || { echo "lowest: no pins read from pyproject.toml" >&2; exit 1; }
stage "pins: ${PINS[*]}"

# torch as scripts/setup.sh gets it on a CPU machine: a local wheel, else PyTorch's CPU index
# (never PyPI's default CUDA build). Its own dependencies come with the install below.
TORCH=$(printf '%s\n' "${PINS[@]}" | grep '^torch==')
stage "installing $TORCH"
"$VPY" -m pip install --no-index --no-deps "$TORCH" 2>/dev/null ||
    "$VPY" -m pip install --no-deps "$TORCH" --index-url https://download.pytorch.org/whl/cpu

stage "installing the pins and mach_lightning (editable)"
"$VPY" -m pip install --progress-bar off "${PINS[@]}" -e ".[test,publish]"
"$VPY" -c "$CHECK_PINS" "${PINS[@]}"

# Every topology's losses against the golden values, a full run and its run directory, W&B
# offline, config loading and errors, the launcher (dry runs, and one job through submitit's
# local executor), the report (matplotlib figures, the W&B Report object), the private Lightning
# and submitit internals still in use (test_internals: the lower bounds are where they differ
# most) and the layering (import-linter at its lower bound).
stage "tests"
"$VPY" -m pytest -p no:cacheprovider -q -x \
    tests/test_config.py tests/test_golden.py tests/test_launch.py \
    tests/test_internals.py tests/test_layering.py \
    tests/test_fit.py::test_run_directory_holds_everything \
    tests/test_fit.py::test_wandb_goes_offline_without_a_key \
    tests/test_report.py::test_figures_and_html_are_written \
    tests/test_report.py::test_wandb_report_object_without_a_server
stage "done"
