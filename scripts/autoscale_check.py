"""Autoscaling shown, not assumed.

Starts a private local autoscaling Ray cluster with Ray's fake multi-node provider
(`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`: "worker nodes" are extra
raylets on this machine that the real Ray autoscaler launches and terminates), deploys the real
LEADRE graph with serve_configs/autoscale_check.yaml (the production autoscaling shape scaled
down) on a tiny synthetic world, drives HTTP load at /recommend (anonymous users with recent ad
clicks: the matcher's real-time ScaNN path), and samples, every couple of seconds, the Serve
replicas per deployment, the alive Ray nodes and the autoscaler's pending launches/demands.

    .venv/bin/python scripts/autoscale_check.py               # ~3-4 minutes on 2 cores
    .venv/bin/python scripts/autoscale_check.py --out /tmp/as  # where the summary goes

Exit status 0 only when all four were observed: (a) Matcher replicas above min_replicas,
(b) at least one fake worker node added by the autoscaler, then, after the load stopped,
(c) Matcher replicas back at min_replicas and (d) the cluster back to the head node alone, and
every process the check started is gone afterwards. Otherwise 1 (or 2 for a crash), with the
reason printed. Writes autoscale_summary.json and autoscale_summary.md to --out (default
runs/autoscale_check). Run by tests/serve/test_autoscale.py (marked slow and cluster).

Never runs `ray stop` (other clusters share this machine): it stops only the processes that
descend from its own `ray start`, and checks that none is left.
"""

from __future__ import annotations

import os

import argparse
import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serve_configs" / "autoscale_check.yaml"
HEAD_CPUS = 1  # the head holds exactly one 1-CPU Matcher replica (min_replicas)
WORKER_CPUS = 2  # each fake worker node holds two more


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_cluster_config(gcs: str, max_workers: int, idle_timeout_s: float) -> dict:
    """Cluster YAML for the fake multi-node provider (keys as in Ray's own
    fake_multi_node/example.yaml, which the wheel does not ship)."""
    return {
        "cluster_name": "leadre-autoscale-check",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {
            "type": "fake_multinode",
            # Fake nodes join this GCS; the provider assumes port 6379 otherwise.
            "gcs_address": gcs,
            # All fake nodes share one IP: without this the autoscaler cannot tell them apart
            # and kills every new node as "launch failed" a second after it starts.
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,  # nothing to ssh into or set up
            "disable_launch_config_check": True,
        },
        "auth": {},
        "docker": {},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            # Must match what `ray start --head` advertises.
            "ray.head.default": {"resources": {"CPU": HEAD_CPUS}, "node_config": {},
                                 "max_workers": 0},
            "ray.worker.cpu": {
                "resources": {"CPU": WORKER_CPUS, "object_store_memory": 100 * 2**20},
                "node_config": {}, "min_workers": 0, "max_workers": max_workers},
        },
        # The launcher reads these keys even though fake nodes run no commands.
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


class FakeCluster:
    """`RAY_FAKE_CLUSTER=1 ray start --head --block` in its own process group on free ports and
    a short private temp dir (unix socket paths are limited to 107 bytes), like tests/conftest's
    HeadNode. Fake worker nodes are raylets spawned by the autoscaler (the monitor process) and
    Ray workers get process groups of their own, so `stop` kills every process ever seen below
    the head, not only the head's group."""

    def __init__(self, tmp: Path, max_workers: int, idle_timeout_s: float):
        self.tmp = tmp
        self.port, self.dashboard_port = free_port(), free_port()
        self.gcs = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        cfg = tmp / "fake_cluster.yaml"
        cfg.write_text(yaml.safe_dump(fake_cluster_config(self.gcs, max_workers,
                                                          idle_timeout_s)))
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "token",
               "RAY_USAGE_STATS_ENABLED": "0",
               "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # react in seconds (Ray's own tests do)
               # Serve is already shut down when we stop the head: skip the 30 s SIGTERM drain.
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
               # Successors of the YAML's deprecated metrics_interval_s (unused by 2.60).
               "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
               "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
               # Replicas and the fake nodes' workers must run this environment's python.
               "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.log_path = tmp / "ray_head.log"
        self._log = open(self.log_path, "w")
        self._seen: dict[int, float] = {}  # pid -> create_time (guards against pid reuse)
        self.proc = subprocess.Popen(
            [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={self.port}",
             f"--num-cpus={HEAD_CPUS}", f"--autoscaling-config={cfg}",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}",
             # Defaults (52365, 10001) may be held by another cluster on this machine.
             f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}",
             "--object-store-memory=150000000", f"--temp-dir={tmp / 'ray'}"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._seen[self.proc.pid] = psutil.Process(self.proc.pid).create_time()

    def wait_ready(self, timeout: float = 180) -> None:
        import urllib.error
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}; see "
                                   f"{self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:  # 401 without a token: the dashboard is up
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"Ray head did not come up in {timeout:.0f} s")

    def track(self) -> None:
        """Remember every current descendant of the head (fake nodes, agents, workers)."""
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    self._seen.setdefault(p.pid, p.create_time())
                except psutil.Error:
                    pass
        except psutil.Error:
            pass

    def _alive(self) -> list[psutil.Process]:
        out = []
        for pid, created in self._seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                pass
        # Anything else still naming our private temp dir is ours too.
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid != os.getpid() and p.pid not in self._seen and \
                        any(str(self.tmp) in a for a in (p.info["cmdline"] or [])):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def stop(self) -> list[str]:
        """Stop everything this cluster started; returns descriptions of survivors."""
        self.track()
        try:  # graceful first: the head drains and stops its own children
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for _ in range(2):
            alive = self._alive()
            if not alive:
                break
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=10)
        try:  # `ray start --block` can outlive its children: make sure the group is gone
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        left = []
        for p in self._alive():
            try:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:160]}")
            except psutil.Error:
                pass
        return left


@dataclass
class Load:
    """Closed-loop HTTP clients, each with one request in flight at a time."""

    base_url: str
    ad_ids: list[str]
    clients: int
    codes: Counter = field(default_factory=Counter)
    in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _client(self, i: int) -> None:
        import httpx

        n = 0
        with httpx.Client(base_url=self.base_url, timeout=30) as c:
            while not self._stop.is_set():
                n += 1
                # Anonymous users with recent ad clicks: the matcher's real-time ScaNN path
                # (unknown users are never queued for the LLM generator).
                clicks = [{"domain": "ad", "action": "click",
                           "ad_id": self.ad_ids[(i * 7919 + n * 31 + j) % len(self.ad_ids)]}
                          for j in range(3)]
                with self._lock:
                    self.in_flight += 1
                try:
                    r = c.post("/recommend", json={"user_id": f"as-load-{i}-{n}", "k": 20,
                                                   "recent_events": clicks})
                    key = str(r.status_code)
                except Exception as e:  # noqa: BLE001 - count it, keep the load going
                    key = type(e).__name__
                    time.sleep(0.2)
                with self._lock:
                    self.in_flight -= 1
                    self.codes[key] += 1

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                         for i in range(self.clients)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(35)


def deployment_options(app: dict) -> dict[str, dict]:
    """The YAML's `deployments:` entries as `build(cfg, options)` overrides."""
    return {d["name"]: {k: v for k, v in d.items() if k != "name"}
            for d in app.get("deployments", [])}


def autoscaler_pending() -> dict[str, int]:
    """Pending node launches and unmet resource demands, from the status the autoscaler
    (v1) publishes in the GCS every update (what `ray status` prints)."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get("__autoscaling_status")
    if not raw:
        return {"launching": 0, "demand": 0}
    status = json.loads(raw)
    report = status.get("autoscaler_report") or {}
    launching = sum((report.get("pending_launches") or {}).values()) + \
        len(report.get("pending_nodes") or [])
    demand = sum(n for _, n in (status.get("load_metrics_report") or {})
                 .get("resource_demand") or [])
    return {"launching": int(launching), "demand": int(demand)}


def matcher_replicas_per_node(app_name: str, head_id: str) -> dict[str, int]:
    """ALIVE Matcher replica actors by node ("head" / "worker"), from the GCS actor table."""
    import ray._private.state as state

    where: Counter = Counter()
    for a in state.actors().values():
        if a.get("State") == "ALIVE" and \
                a.get("ActorClassName", "").endswith(f"{app_name}:Matcher"):
            node = (a.get("Address") or {}).get("NodeID")
            where["head" if node == head_id else "worker"] += 1
    return dict(where)


def sample(t0: float, phase: str, app_name: str, head_id: str, load: Load | None) -> dict:
    import ray
    from ray import serve

    app = serve.status().applications.get(app_name)
    deps: dict[str, dict[str, int]] = {}
    for name, st in (app.deployments.items() if app else []):
        states = {getattr(k, "value", k): v for k, v in st.replica_states.items()}
        deps[name] = {"running": states.get("RUNNING", 0), "total": sum(states.values())}
    nodes = [n for n in ray.nodes() if n["Alive"]]
    try:
        placement = matcher_replicas_per_node(app_name, head_id)
    except Exception:  # noqa: BLE001 - internal API: the timeline is useful without it
        placement = {}
    return {"t": round(time.time() - t0, 1), "phase": phase, "replicas": deps,
            "nodes": len(nodes), "workers": sum(n["NodeID"] != head_id for n in nodes),
            "matcher_on_workers": placement.get("worker", 0), "pending": autoscaler_pending(),
            "in_flight": load.in_flight if load else 0,
            "requests": sum(load.codes.values()) if load else 0}


def fmt(s: dict) -> str:
    r = s["replicas"]

    def rc(name: str) -> str:
        d = r.get(name, {"running": 0, "total": 0})
        return f"{d['running']}/{d['total']}"

    return (f"{s['t']:7.1f}  {s['phase']:<8} {rc('Ingress'):>7} {rc('Matcher'):>7} "
            f"{rc('Generator'):>9} {s['matcher_on_workers']:>7} {s['nodes']:>5} "
            f"{s['pending']['launching']:>9} {s['pending']['demand']:>6} "
            f"{s['in_flight']:>9} {s['requests']:>8}")


HEADER = ("    t_s  phase    Ingress Matcher Generator on_wkrs nodes launching demand "
          "in_flight requests")


def write_summary(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "autoscale_summary.json").write_text(json.dumps(report, indent=1))
    c, tm, pk = report.get("checks", {}), report.get("times", {}), report.get("peak", {})
    lines = [
        "# Autoscaling check (fake multi-node cluster)", "",
        f"Result: **{'PASS' if report['ok'] else 'FAIL'}** - {report.get('message', '')}", "",
        "| check | observed |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in c.items()], "",
        f"Peak: Matcher {pk.get('matcher_running')} running replicas "
        f"(min {report.get('matcher_min')}, max {report.get('matcher_max')}), "
        f"{pk.get('nodes')} alive nodes ({pk.get('workers')} fake workers), "
        f"{pk.get('matcher_on_workers')} Matcher replicas on fake workers.", "",
        "Times (s, from the start of the load): " + ", ".join(
            f"{k}={v}" for k, v in tm.items()), "",
        f"HTTP results: {report.get('http', {})}", "",
        "Replicas are running/total. on_wkrs: Matcher replicas on fake worker nodes; "
        "launching: nodes the autoscaler is starting; demand: unmet resource requests "
        "(pending replicas); in_flight: HTTP requests open.", "",
        "```", HEADER, *[fmt(s) for s in report.get("timeline", [])], "```", ""]
    (out / "autoscale_summary.md").write_text("\n".join(lines))


@dataclass
class Plan:
    """What serve_configs/autoscale_check.yaml asks for, and the cluster that fits it."""

    raw: dict
    app: dict
    options: dict[str, dict]
    min_replicas: int
    max_replicas: int
    max_workers: int

    @classmethod
    def load(cls, path: Path = SERVE_CONFIG) -> "Plan":
        from ray.serve.schema import ServeDeploySchema

        raw = yaml.safe_load(path.read_text())
        ServeDeploySchema.model_validate(raw)  # the file stays a deployable Serve config
        app = raw["applications"][0]
        options = deployment_options(app)
        auto = options["Matcher"]["autoscaling_config"]
        lo, hi = int(auto["min_replicas"]), int(auto["max_replicas"])
        # Enough fake workers for max_replicas Matcher replicas beyond the head's CPU, no
        # more: the autoscaler adds nodes only for replicas Serve wants and cannot place.
        cpus = float(options["Matcher"]["ray_actor_options"]["num_cpus"])
        max_workers = max(1, math.ceil((hi * cpus - HEAD_CPUS) / WORKER_CPUS))
        return cls(raw, app, options, lo, hi, max_workers)


def run_check(args: argparse.Namespace, plan: Plan, cluster: FakeCluster, tmp: Path,
              report: dict) -> None:
    """Build, connect, deploy, load, observe; fills ``report`` (cleanup is main's job)."""
    import ray
    from ray import serve

    from leadre.artifacts import read_table
    from leadre.config import from_dict
    from leadre.serve import ServeConfig
    from leadre.serve.app import build

    raw, app_cfg, options = plan.raw, plan.app, plan.options
    app_name = app_cfg["name"]
    lo = plan.min_replicas
    t_start = time.time()
    # The world builds (CPU-bound, no Ray) while the head boots.
    sys.path.insert(0, str(REPO / "tests"))
    from serving_world import make_world

    world = make_world(tmp / "world", ads=args.ads, users=args.users)
    report["world_s"] = round(time.time() - t_start, 1)
    cluster.wait_ready()
    ray.init(address=cluster.gcs, log_to_driver=False, logging_level="WARNING")
    got = ray.get_runtime_context().gcs_address
    if not got.endswith(f":{cluster.port}"):  # never touch someone else's cluster
        raise RuntimeError(f"connected to {got}, not the cluster started here ({cluster.gcs})")
    head_id = ray.get_runtime_context().get_node_id()
    report["cluster_ready_s"] = round(time.time() - t_start, 1)

    http_port = free_port()
    serve.start(proxy_location=raw.get("proxy_location", "HeadOnly"),
                http_options={**raw.get("http_options", {}), "host": "127.0.0.1",
                              "port": http_port})
    args_ = {**app_cfg["args"], "index_dir": world["index"], "sids_dir": world["sids"],
             "store_url": f"sqlite:///{tmp / 'store.db'}", "app_name": app_name}
    serve.run(build(from_dict(ServeConfig, args_), options), name=app_name,
              route_prefix=app_cfg.get("route_prefix", "/"))
    report["deployed_s"] = round(time.time() - t_start, 1)
    ads = read_table(world["ingest"], "ads")
    ad_ids = [a for a, act in zip(ads.column("ad_id").to_pylist(),
                                  ads.column("active").to_pylist()) if act]

    timeline: list[dict] = report["timeline"]
    t0 = time.time()

    def tick(phase: str, load: Load | None) -> dict:
        cluster.track()
        s = sample(t0, phase, app_name, head_id, load)
        timeline.append(s)
        print(fmt(s), flush=True)
        return s

    def matcher(s: dict) -> dict[str, int]:
        return s["replicas"].get("Matcher", {"running": 0, "total": 0})

    print(HEADER, flush=True)
    # Baseline: min replicas, head alone.
    deadline = time.time() + 120
    while True:
        s = tick("baseline", None)
        if matcher(s)["running"] == lo and s["nodes"] == 1:
            break
        if time.time() > deadline:
            raise RuntimeError("the cluster never settled at min_replicas on the head alone")
        time.sleep(args.interval)

    load = Load(f"http://127.0.0.1:{http_port}", ad_ids, args.clients)
    t_load = time.time()
    load.start()
    times: dict[str, float | None] = {"replicas_up": None, "node_added": None,
                                      "replica_on_worker": None, "load_stopped": None,
                                      "replicas_down": None, "nodes_down": None}
    while True:
        time.sleep(args.interval)
        s = tick("load", load)
        if times["replicas_up"] is None and matcher(s)["running"] > lo:
            times["replicas_up"] = s["t"]
        if times["node_added"] is None and s["workers"] > 0:
            times["node_added"] = s["t"]
        if times["replica_on_worker"] is None and s["matcher_on_workers"] > 0:
            times["replica_on_worker"] = s["t"]
        up = all(times[k] is not None for k in ("replicas_up", "node_added"))
        # Hold the load a little after scaling up so the timeline shows the plateau.
        if up and s["t"] - max(times["replicas_up"], times["node_added"]) >= args.hold:
            break
        if time.time() - t_load > args.load_timeout:
            break
    load.stop()
    times["load_stopped"] = round(time.time() - t0, 1)
    report["http"] = dict(load.codes)

    if times["replicas_up"] is not None:  # nothing to come down from otherwise
        deadline = time.time() + args.down_timeout
        while time.time() < deadline:
            time.sleep(args.interval)
            s = tick("idle", load)
            m = matcher(s)
            if times["replicas_down"] is None and m["running"] == m["total"] == lo:
                times["replicas_down"] = s["t"]
            if times["nodes_down"] is None and s["nodes"] == 1 and \
                    s["pending"]["launching"] == 0:
                times["nodes_down"] = s["t"]
            if times["replicas_down"] is not None and times["nodes_down"] is not None:
                break
    report["times"] = times

    def peak(key: Callable[[dict], int]) -> int:  # over the whole run: late nodes count too
        return max((key(s) for s in timeline), default=0)

    report["peak"] = {"matcher_running": peak(lambda s: matcher(s)["running"]),
                      "matcher_total": peak(lambda s: matcher(s)["total"]),
                      "nodes": peak(lambda s: s["nodes"]),
                      "workers": peak(lambda s: s["workers"]),
                      "matcher_on_workers": peak(lambda s: s["matcher_on_workers"])}
    report["checks"] = {
        "a_matcher_scaled_up": times["replicas_up"] is not None,
        "b_fake_worker_added": times["node_added"] is not None,
        "c_matcher_scaled_down": times["replicas_down"] is not None,
        "d_nodes_scaled_down": times["nodes_down"] is not None,
    }
    # A load that never got through proves nothing.
    report["checks"]["e_load_answered"] = load.codes.get("200", 0) > 0


def _disconnect() -> None:
    """Shut Serve down and leave the cluster before its processes go (bounded: a wedged
    cluster must not hang the check)."""
    def work() -> None:
        try:
            import ray
            from ray import serve

            if ray.is_initialized():
                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
        except Exception:  # noqa: BLE001 - the cluster is killed next anyway
            traceback.print_exc()

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(90)



def main(argv: list[str] | None = None) -> int:
    # Here, not at import (the tests import this module): before anything imports ray, the
    # driver must send the cluster's auth token (Ray 2.60 CLI clients need RAY_AUTH_MODE=token), and never join another cluster.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("RAY_ADDRESS", None)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "autoscale_check"),
                    help="where autoscale_summary.json/.md are written")
    ap.add_argument("--ads", type=int, default=600, help="ads in the tiny synthetic world")
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    ap.add_argument("--interval", type=float, default=3.0, help="seconds between samples")
    ap.add_argument("--hold", type=float, default=10.0,
                    help="seconds of load kept after the scale-up was observed")
    ap.add_argument("--load-timeout", type=float, default=150.0,
                    help="give up on the scale-up after this many seconds of load")
    ap.add_argument("--down-timeout", type=float, default=180.0,
                    help="give up on the scale-down after this many idle seconds")
    ap.add_argument("--idle-timeout", type=float, default=15.0,
                    help="seconds a fake worker must be idle before the autoscaler removes it")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the cluster's logs")
    args = ap.parse_args(argv)

    t_begin = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="leadre-as-", dir="/tmp"))
    # tmp_dir: the cluster's private dir (gone afterwards); no process may still name it.
    report: dict[str, Any] = {"ok": False, "timeline": [], "checks": {}, "tmp_dir": str(tmp)}
    crashed = False
    cluster: FakeCluster | None = None
    try:
        plan = Plan.load()
        report.update(
            matcher_min=plan.min_replicas, matcher_max=plan.max_replicas,
            matcher_autoscaling=plan.options["Matcher"]["autoscaling_config"],
            cluster={"head_cpus": HEAD_CPUS, "worker_cpus": WORKER_CPUS,
                     "max_workers": plan.max_workers, "idle_timeout_s": args.idle_timeout})
        cluster = FakeCluster(tmp, plan.max_workers, args.idle_timeout)
        run_check(args, plan, cluster, tmp, report)
    except BaseException as e:  # noqa: BLE001 - report it, then clean up (KeyboardInterrupt too)
        crashed = True
        traceback.print_exc()
        report["error"] = f"{type(e).__name__}: {e}"
    finally:
        _disconnect()
        report["leftover_processes"] = cluster.stop() if cluster else []
        report["total_s"] = round(time.time() - t_begin, 1)
    checks = report["checks"]
    failed = [k for k, v in checks.items() if not v]
    if crashed:
        report["message"] = f"crashed: {report['error']}"
    elif failed:
        report["message"] = "not observed: " + ", ".join(failed)
    elif report["leftover_processes"]:
        report["message"] = f"{len(report['leftover_processes'])} processes survived cleanup"
    else:
        report["ok"] = bool(checks)
        t = report["times"]
        report["message"] = (
            f"Matcher {report['matcher_min']} -> {report['peak']['matcher_running']} -> "
            f"{report['matcher_min']} replicas, nodes 1 -> {report['peak']['nodes']} -> 1; "
            f"up after {max(t['replicas_up'], t['node_added'])} s of load, down "
            f"{round(max(t['replicas_down'], t['nodes_down']) - t['load_stopped'], 1)} s "
            f"after it stopped")
    if crashed or not report["ok"]:
        log = tmp / "ray_head.log"
        if log.exists():
            print(log.read_text()[-2000:], file=sys.stderr)
    out = Path(args.out)
    write_summary(out, report)
    print(f"\n{'PASS' if report['ok'] else 'FAIL'}: {report['message']}")
    print(f"total {report['total_s']} s; summary: {out / 'autoscale_summary.md'}")
    if report["leftover_processes"]:
        print("left running:\n  " + "\n  ".join(report["leftover_processes"]), file=sys.stderr)
    if args.keep_tmp:
        print(f"cluster logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if report["ok"] else (2 if crashed else 1)


if __name__ == "__main__":
    sys.exit(main())
