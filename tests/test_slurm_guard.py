"""The Slurm tests submit only to the dev cluster: the decision, with fake `scontrol`/`sinfo`.

A login node's `sinfo` answers for the site's cluster; these fakes play such a cluster (another
ClusterName, or the dev cluster's name with a slurm.conf that slurm/dev-cluster.sh did not write)
and the dev cluster itself, so the decision is checked without submitting anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import slurm_guard

DEV_NAME, MARKER = slurm_guard.dev_cluster_identity()


def fake_slurm(tmp_path: Path, cluster: str, conf_first_line: str, nodes: int = 2) -> dict:
    """An environment whose PATH holds only a fake `scontrol` (this ClusterName, a slurm.conf
    starting with this line) and a fake `sinfo` (partition debug with `nodes` idle nodes)."""
    bin_dir, conf = tmp_path / "bin", tmp_path / "slurm.conf"
    bin_dir.mkdir()
    conf.write_text(f"{conf_first_line}\nClusterName={cluster}\n")
    scripts = {
        "scontrol": f"echo 'ClusterName             = {cluster}'\n"
        f"echo 'SLURM_CONF              = {conf}'\n",
        "sinfo": f"echo '{nodes} idle'\n",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}")
        (bin_dir / name).chmod(0o755)
    return {"PATH": str(bin_dir)}


def test_the_dev_cluster_is_recognised_by_its_name_and_slurm_conf(tmp_path):
    assert slurm_guard.decide(fake_slurm(tmp_path, DEV_NAME, MARKER + ": edit the script")) == (
        "run",
        "",
    )


def test_another_cluster_with_a_two_node_debug_partition_is_skipped(tmp_path):
    env = fake_slurm(tmp_path, "hpc-site", "# site config")
    action, why = slurm_guard.decide(env)
    assert action == "skip" and "`hpc-site`, not the dev cluster" in why, why
    assert "MACH_SLURM_TESTS=1" in why  # how to run them there anyway


def test_a_site_cluster_that_happens_to_share_the_name_is_skipped(tmp_path):
    action, why = slurm_guard.decide(fake_slurm(tmp_path, DEV_NAME, "# site config"))
    assert action == "skip" and "did not write" in why, why


def test_ci_fails_rather_than_submitting_to_another_cluster(tmp_path):
    env = {**fake_slurm(tmp_path, "hpc-site", "# site config"), "CI": "true"}
    action, why = slurm_guard.decide(env)
    assert action == "fail" and why.startswith("CI=true but") and "hpc-site" in why, why


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"MACH_SLURM_TESTS": "1"}, "run"),  # opted in: any cluster that answers
        ({"MACH_SLURM_TESTS": "0", "CI": "true"}, "skip"),
    ],
)
def test_the_opt_in_variable(tmp_path, env, expected):
    assert slurm_guard.decide({**fake_slurm(tmp_path, "hpc-site", "#"), **env})[0] == expected


def test_no_slurm_skips_and_fails_only_when_asked(tmp_path):
    empty = {"PATH": str(tmp_path)}
    assert slurm_guard.decide(empty)[0] == "skip"
    assert slurm_guard.decide({**empty, "CI": "true"})[0] == "fail"


def test_a_dev_cluster_without_two_nodes_is_not_used(tmp_path):
    action, why = slurm_guard.decide(fake_slurm(tmp_path, DEV_NAME, MARKER, nodes=1))
    assert action == "skip" and "1 usable nodes" in why, why


def test_the_slurm_tests_ask_the_guard(monkeypatch):
    from . import test_slurm

    monkeypatch.setattr(test_slurm.slurm_guard, "decide", lambda: ("skip", "not the dev cluster"))
    with pytest.raises(pytest.skip.Exception, match="not the dev cluster"):
        test_slurm.cluster.__wrapped__()


def test_the_running_dev_cluster_is_recognised():
    conf = Path("/etc/slurm/slurm.conf")
    if not (conf.is_file() and conf.read_text().startswith(MARKER)):
        pytest.skip("the dev cluster of slurm/dev-cluster.sh is not configured on this machine")
    assert slurm_guard.not_dev_cluster(dict(os.environ)) == ""
