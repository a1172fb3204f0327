"""Autoscaling shown, not assumed (scripts/autoscale_check.py): on a local fake multi-node
Ray cluster, the Matcher's replicas and the fake worker nodes scale up under load and back down
when idle. The two fast tests check the config it deploys; test_fake_multinode_autoscaling runs
the whole check (a few minutes on 2 cores, its own `ray start --head`). It is marked `cluster`,
not `slow`, so the default suite (`make test`) runs it; alone:

    .venv/bin/pytest tests/serve/test_autoscale.py::test_fake_multinode_autoscaling
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "autoscale_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("autoscale_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


def deployments(name: str) -> dict[str, dict]:
    raw = yaml.safe_load((REPO / "serve_configs" / name).read_text())
    return {d["name"]: d for d in raw["applications"][0]["deployments"]}


def test_check_config_is_production_scaled_down():
    """The check deploys the production autoscaling shape, only smaller and faster."""
    check = load_script()
    plan = check.Plan.load()  # also validates the file against Ray Serve's schema
    prod, small = deployments("production.yaml"), deployments("autoscale_check.yaml")
    assert set(small) == set(prod)
    auto, prod_auto = small["Matcher"]["autoscaling_config"], prod["Matcher"]["autoscaling_config"]
    assert set(prod_auto) <= set(auto)
    assert 1 <= auto["min_replicas"] < auto["max_replicas"] <= prod_auto["max_replicas"]
    assert auto["downscale_delay_s"] <= prod_auto["downscale_delay_s"]
    # Only the Matcher (the HTTP ingress tier) may ask the cluster autoscaler for nodes.
    assert set(small) == {"Matcher", "Generator"}
    assert "autoscaling_config" not in small["Generator"]
    assert small["Generator"]["ray_actor_options"]["num_cpus"] == 0
    assert small["Matcher"]["ray_actor_options"]["num_cpus"] > 0
    # Room for max_replicas, so scale-up needs at least one fake worker node.
    cpus = small["Matcher"]["ray_actor_options"]["num_cpus"]
    assert plan.min_replicas * cpus <= check.HEAD_CPUS < plan.max_replicas * cpus
    assert check.HEAD_CPUS + plan.max_workers * check.WORKER_CPUS >= plan.max_replicas * cpus


def test_fake_cluster_config_passes_ray_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = load_script().fake_cluster_config("127.0.0.1:40000", max_workers=2, idle_timeout_s=15)
    jsonschema.validate(cfg, schema)
    assert cfg["provider"]["gcs_address"] == "127.0.0.1:40000"  # head is not on 6379
    assert cfg["provider"]["use_node_id_as_ip"] is True  # fake nodes share one IP


@pytest.mark.cluster
def test_fake_multinode_autoscaling(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    summary = tmp_path / "autoscale_summary.json"
    assert summary.exists(), (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads(summary.read_text())
    assert proc.returncode == 0 and report["ok"], (report.get("message"), proc.stdout[-3000:],
                                                   proc.stderr[-3000:])
    assert all(report["checks"].values()), report["checks"]
    lo, peak, t = report["matcher_min"], report["peak"], report["times"]
    assert peak["matcher_running"] > lo  # (a) replicas above min under load
    assert peak["workers"] >= 1 and peak["nodes"] >= 2  # (b) the autoscaler added a node
    assert peak["matcher_on_workers"] >= 1  # ... and a Matcher replica ran on it
    assert t["load_stopped"] < t["replicas_down"] and t["load_stopped"] < t["nodes_down"]
    last = report["timeline"][-1]  # (c) back to min replicas on the head alone
    assert last["phase"] == "idle" and last["nodes"] == 1
    assert last["replicas"]["Matcher"]["running"] == last["replicas"]["Matcher"]["total"] == lo
    assert report["http"].get("200", 0) > 0
    assert (tmp_path / "autoscale_summary.md").read_text().count("PASS") == 1
    # Every process the check started is gone.
    assert report["leftover_processes"] == []
    mine = [p.pid for p in psutil.process_iter(["cmdline"])
            if any(report["tmp_dir"] in a for a in (p.info["cmdline"] or []))]
    assert mine == []
