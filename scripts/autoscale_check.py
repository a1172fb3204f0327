"""Autoscaling shown, not assumed: a local autoscaling cluster with Ray's fake multi-node
provider, the LEADRE graph deployed with the production autoscaling config scaled down, load
driven at it, and the matcher replicas and fake worker nodes observed scaling up and back down.

    .venv/bin/python scripts/autoscale_check.py --ads 600 --users 200   # ~3-5 minutes

It starts its own `ray start --head` (RAY_FAKE_CLUSTER=1, --autoscaling-config) on free ports
in a private temp dir and stops only that process group. Exit status 0 when both the scale-up
and the scale-down were observed; a JSON report (timeline of replicas and nodes) is printed.
Run by tests/test_autoscale.py (marked slow and cluster).
"""

from __future__ import annotations

import os

# Before anything imports ray: the driver must send the cluster's auth token (STACK-NOTES).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_cluster_config(gcs: str, max_workers: int) -> dict:
    return {
        "cluster_name": "leadre-fake",
        "max_workers": max_workers,
        "upscaling_speed": 2.0,
        "idle_timeout_minutes": 0.2,
        "provider": {"type": "fake_multinode", "gcs_address": gcs, "launch_multiple": True},
        "auth": {"ssh_user": "ubuntu"},
        # The launcher reads these keys even though fake nodes run no commands.
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "head_node_type": "ray.head.default",
        "available_node_types": {
            # The head hosts the controller, proxy, ingress and generator (0 CPU replicas).
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            # Matcher replicas need 1 CPU each: every extra replica needs a new fake node.
            "cpu_worker": {"resources": {"CPU": 1, "object_store_memory": 100 * 2**20},
                           "node_config": {}, "min_workers": 0, "max_workers": max_workers},
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ads", type=int, default=600)
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--load-seconds", type=float, default=60)
    ap.add_argument("--timeout", type=float, default=240, help="wait for scale-down")
    args = ap.parse_args()

    from serving_world import make_world

    tmp = Path(tempfile.mkdtemp(prefix="leadre-as-", dir="/tmp"))
    world = make_world(tmp / "w", ads=args.ads, users=args.users)
    port, dash = free_port(), free_port()
    gcs = f"127.0.0.1:{port}"
    cfg_path = tmp / "fake.yaml"
    cfg_path.write_text(yaml.safe_dump(fake_cluster_config(gcs, args.max_replicas)))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "token",
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp / "head.log", "w")
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=0",
         f"--autoscaling-config={cfg_path}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--object-store-memory=200000000", f"--temp-dir={tmp / 'ray'}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    report: dict = {"timeline": []}
    ok = False
    try:
        import httpx
        import ray
        from ray import serve

        from leadre.serve import ServeConfig
        from leadre.serve.app import build

        for _ in range(60):
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with {head.returncode}: see head.log")
            if (tmp / "ray").exists() and list((tmp / "ray").glob("session_*/logs/gcs_server.out")):
                break
            time.sleep(1)
        ray.init(address=gcs, log_to_driver=False)
        got = ray.get_runtime_context().gcs_address  # never touch someone else's cluster
        if not got.endswith(f":{port}"):
            raise RuntimeError(f"connected to {got}, not the cluster started here ({gcs})")
        http = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": http})
        # The production autoscaling config (serve_configs/production.yaml), scaled down.
        matcher_opts = {"autoscaling_config": {
            "min_replicas": 1, "max_replicas": args.max_replicas, "target_ongoing_requests": 1,
            "upscale_delay_s": 2, "downscale_delay_s": 10, "metrics_interval_s": 1,
            "look_back_period_s": 3}, "ray_actor_options": {"num_cpus": 1}}
        app = build(ServeConfig(index_dir=world["index"], sids_dir=world["sids"],
                                store_url=f"sqlite:///{tmp / 'store.db'}", generator_gpus=0,
                                replica_cpus=0, generator_cpus=0),
                    {"Matcher": matcher_opts})
        serve.run(app, name="leadre-as", route_prefix="/")
        base = f"http://127.0.0.1:{http}"

        def snapshot(phase: str) -> dict:
            st = serve.status().applications["leadre-as"].deployments["Matcher"]
            nodes = [n for n in ray.nodes() if n["Alive"]]
            s = {"t": round(time.time() - t0, 1), "phase": phase,
                 "matcher_replicas": sum(st.replica_states.values()) if st.replica_states else 0,
                 "running": st.replica_states.get("RUNNING", 0), "nodes": len(nodes)}
            report["timeline"].append(s)
            print(json.dumps(s), flush=True)
            return s

        t0 = time.time()
        stop = threading.Event()
        codes: dict = {}

        def load(i: int) -> None:
            with httpx.Client(base_url=base, timeout=30) as c:
                n = 0
                while not stop.is_set():
                    r = c.post("/recommend", json={"user_id": f"u{(i * 31 + n) % 500:07d}",
                                                   "k": 50})
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    n += 1

        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        peak = {"matcher_replicas": 1, "nodes": 1}
        end = time.time() + args.load_seconds
        while time.time() < end:
            s = snapshot("load")
            peak = {k: max(peak[k], s[k]) for k in peak}
            time.sleep(3)
        stop.set()
        for t in threads:
            t.join(30)
        down = None
        end = time.time() + args.timeout
        while time.time() < end:
            s = snapshot("idle")
            if s["running"] <= 1 and s["nodes"] <= 2 and s["matcher_replicas"] <= 1:
                down = s
                if s["nodes"] <= 1:
                    break
            time.sleep(5)
        report.update(peak=peak, scaled_down=down, http_codes=codes)
        ok = peak["matcher_replicas"] > 1 and peak["nodes"] > 1 and down is not None
        serve.shutdown()
        ray.shutdown()
    except Exception:  # noqa: BLE001 - print it before the head goes (Ray may abort the driver)
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
                head.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        log.close()
        report["ok"] = ok
        print(json.dumps(report, indent=1))
        if not ok:
            print((tmp / "head.log").read_text()[-3000:], file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
