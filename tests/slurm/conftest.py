"""The single-node SLURM of tests/slurm: started once for the session, stopped by PID after it."""

from __future__ import annotations

import os
import sys

import pytest

from slurm_cluster import Cluster, ClusterUnavailable


def pytest_configure(config):
    # here rather than in pyproject.toml, whose hash makes tools/setup_env.sh reinstall .venv
    config.addinivalue_line("markers", "slurm: jobs on a local single-node SLURM (tests/slurm; "
                                       "deselect with -m 'not slurm')")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """munge + slurmctld + slurmd on this machine (apt-get installs slurm-wlm and munge if
    missing and we are root); skips with the reason where SLURM cannot run here, fails
    instead under MFT_REQUIRE_SLURM=1."""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"a local SLURM needs Linux, this is {sys.platform}")
    root = tmp_path_factory.mktemp("slurm")
    try:
        cluster = Cluster.start(root)
    except ClusterUnavailable as e:
        if os.environ.get("MFT_REQUIRE_SLURM") == "1":  # CI (.ci/run): a skip would hide the tests
            pytest.fail(f"MFT_REQUIRE_SLURM=1 but no local SLURM: {e}")
        pytest.skip(f"no local SLURM: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
