"""Whether the Slurm tests may submit jobs here: only to the dev cluster, recognised for certain.

The tests submit real jobs. On an HPC login node `sinfo` answers too, for the site's cluster, which
may well have a `debug` partition with two nodes: so a cluster is only taken for the dev cluster
of slurm/dev-cluster.sh when the controller reports that script's ClusterName and the slurm.conf
it reads (SLURM_CONF in `scontrol show config`) starts with the line the script marks its files
with. Anything else skips, unless asked: CI=true makes a missing dev cluster a failure (CI must
run these tests, and never against another cluster); MACH_SLURM_TESTS=1 runs them against
whatever cluster answers (its own risk); MACH_SLURM_TESTS=0 skips them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "dev-cluster.sh"
HINT = "start the dev cluster with `sudo slurm/dev-cluster.sh start`"


def dev_cluster_identity(script: Path = SCRIPT) -> tuple[str, str]:
    """(ClusterName, first-line marker) that slurm/dev-cluster.sh writes into slurm.conf."""
    text = script.read_text()
    name = re.search(r"^ClusterName=(\S+)$", text, re.M)
    marker = re.search(r'^MARKER="([^"]+)"$', text, re.M)
    assert name and marker, f"{script} no longer sets ClusterName= and MARKER=: update {__file__}"
    return name.group(1), marker.group(1)


def _run(cmd: list[str], env: dict) -> tuple[str, str]:
    """(stdout, problem): problem is '' when the command answered."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=env)
    except (OSError, subprocess.SubprocessError) as err:
        return "", f"`{cmd[0]}` did not answer: {err}"
    if out.returncode != 0:
        return "", f"no Slurm cluster answers (`{' '.join(cmd)}` failed: {out.stderr.strip()})"
    return out.stdout, ""


def not_dev_cluster(env: dict) -> str:
    """'' when the answering controller is the dev cluster, else why it is not."""
    text, problem = _run(["scontrol", "show", "config"], env)
    if problem:
        return problem
    config = dict(re.findall(r"^(\w+)\s*=\s*(.*?)\s*$", text, re.M))
    name, marker = dev_cluster_identity()
    cluster = config.get("ClusterName", "?")
    if cluster != name:
        return f"the Slurm cluster here is `{cluster}`, not the dev cluster `{name}`"
    conf = Path(config.get("SLURM_CONF", "/nonexistent"))
    try:
        first = conf.read_text(errors="replace").splitlines()[:1]
    except OSError:
        first = []
    if first and first[0].startswith(marker):
        return ""
    return f"cluster `{cluster}` uses {conf}, which slurm/dev-cluster.sh did not write"


def usable_nodes_problem(env: dict) -> str:
    """'' when partition `debug` has the two nodes the tests use."""
    text, problem = _run(["sinfo", "-h", "-p", "debug", "-o", "%D %T"], env)
    if problem:
        return problem
    usable = ("idle", "mixed", "allocated", "completing")
    nodes = sum(
        int(line.split()[0])
        for line in text.splitlines()
        if len(line.split()) == 2 and line.split()[1].rstrip("*~#") in usable
    )
    return "" if nodes >= 2 else f"partition `debug` has {nodes} usable nodes, need 2"


def decide(env: dict | None = None) -> tuple[str, str]:
    """('run', '') or ('skip' | 'fail', why) for the Slurm tests under this environment."""
    env = dict(os.environ if env is None else env)
    opt_in, ci = env.get("MACH_SLURM_TESTS", ""), env.get("CI") == "true"
    if opt_in == "0":
        return "skip", "MACH_SLURM_TESTS=0"
    asked = "fail" if ci or opt_in == "1" else "skip"
    if not all(shutil.which(cmd, path=env.get("PATH")) for cmd in ("scontrol", "sinfo")):
        return asked, f"Slurm is not installed (no `scontrol`/`sinfo`); {HINT}"
    problem = not_dev_cluster(env)
    if problem and opt_in != "1":
        why = f"{problem}: the Slurm tests submit jobs only to the dev cluster; {HINT}"
        return ("fail", f"CI=true but {why}") if ci else ("skip", f"{why} (or MACH_SLURM_TESTS=1)")
    problem = usable_nodes_problem(env)
    if problem:
        return asked, f"{problem}; {HINT}"
    return "run", ""
