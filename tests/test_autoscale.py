"""Autoscaling on a local fake multi-node cluster (scripts/autoscale_check.py): matcher
replicas and fake worker nodes scale up under load and back down when idle.

Slow (3-5 minutes on 2 cores) and starts its own `ray start --head`: run with
`pytest -m "slow and cluster" tests/test_autoscale.py`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.cluster
def test_fake_multinode_autoscaling():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "autoscale_check.py")],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    out = proc.stdout
    report = json.loads(out[out.index("{\n"):]) if "{\n" in out else {}
    assert proc.returncode == 0, (out[-3000:], proc.stderr[-3000:])
    assert report["peak"]["matcher_replicas"] > 1 and report["peak"]["nodes"] > 1
    assert report["scaled_down"] is not None
