"""`leadre serve` as a user runs it: a subprocess that starts its own Ray cluster in Serve's
high-throughput mode (HAProxy in front of the Matcher replica's own HTTP server), then the HTTP
contract over real sockets: answers, 422, a real 8 MB body's 413, the admin token, the live ad
status, and a graceful SIGTERM. The other serving tests run on the session's cluster with Serve's
Python proxy, so both HTTP fronts are covered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from leadre.index.context import user_contexts
from leadre.serve.store import open_store

from conftest import free_port, kill_session
from load_client import Load
from serving_world import make_world

TOKEN = "cli-test-token"
SHUTDOWN_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    w = make_world(root, ads=300, users=60)
    store = f"sqlite:///{root / 'store.db'}"
    with open_store(store) as s:
        s.put_users(user_contexts(w["ingest"]))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(LEADRE_ADMIN_TOKEN=TOKEN, RAY_USAGE_STATS_ENABLED="0",
               # HAProxy's metrics and stats listeners default to fixed ports (9101, 8404):
               # another Serve app on the machine would make this one fail to start.
               RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
               RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()))
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "leadre"), "serve", "--index-dir", w["index"],
         "--sids-dir", w["sids"], "--store-url", store, "--port", str(port),
         "--set", "ray.num_cpus=2", "--set", "ray.object_store_mb=200",
         "--set", "matcher.num_cpus=0.1", "--set", "generator.generation.num_cpus=0.1",
         "--set", "generator.generation.num_gpus=0",
         "--shutdown-timeout-s", str(SHUTDOWN_TIMEOUT_S)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        # A suite started in the background (`pytest &` from a script) ignores SIGINT, and a
        # child inherits that: give `leadre serve` the Ctrl-C a terminal user has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        if proc.poll() is not None:
            log.close()
            pytest.fail(f"leadre serve exited with {proc.returncode}:\n"
                        f"{(root / 'serve.log').read_text()[-3000:]}")
        # Up when it says so (the graph is deployed and it waits for Ctrl-C) and HTTP answers.
        if "LEADRE serving at" in (root / "serve.log").read_text():
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail("leadre serve never answered /healthz")
        time.sleep(1)
    yield {"base": base, "proc": proc, "world": w, "store": store}
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does: serve.shutdown, then exit
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            pass
    kill_session(proc.pid)  # anything of its cluster still alive
    log.close()


def test_high_throughput_mode_serves_the_http_contract(served):
    base, proc = served["base"], served["proc"]
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert any(p.name() == "haproxy" for p in tree), "not in Serve's HAProxy mode"
    with httpx.Client(base_url=base, timeout=30) as c:
        users = list(user_contexts(served["world"]["ingest"]))
        out = c.post("/recommend", json={"user_id": users[0], "k": 5})
        assert out.status_code == 200 and len(out.json()["ads"]) == 5
        assert out.headers["content-type"] == "application/json"
        assert c.post("/recommend", json={"user_id": "u1", "k": 0}).status_code == 422
        assert c.post("/recommend", content=b"{", headers={
            "content-type": "application/json"}).status_code == 400
        r = c.post("/recommend", content=b"x" * (8 * 2**20),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["error"]
        assert c.get("/healthz").status_code == 200  # still serving after the big upload

        victim = c.post("/recommend", json={"user_id": "anon", "k": 3}).json()["ads"][0]
        change = {"ad_ids": [victim["ad_id"]], "active": False}
        assert c.post("/admin/ads", json=change).status_code == 401
        r = c.post("/admin/ads", json=change, headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.json()["replicas"] == 1
        after = c.post("/recommend", json={"user_id": "anon", "k": 3}).json()["ads"]
        assert victim["ad_id"] not in {a["ad_id"] for a in after}


def test_sigterm_drains_the_requests_in_flight_and_exits_0(served):
    """What systemd or Kubernetes sends (Ctrl-C takes the same path): every request sent
    before the signal is answered, and the command exits 0 within shutdown_timeout_s."""
    proc, users = served["proc"], list(user_contexts(served["world"]["ingest"]))
    with Load(served["base"], users, threads=3, pause_s=0.0, timeout_s=10.0) as load:
        time.sleep(2)
        t_term = time.time()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(SHUTDOWN_TIMEOUT_S + 15)
        took = time.time() - t_term
    before = [s for s in load.log if s.t < t_term]
    print(f"[sigterm] {len(before)} requests sent before the signal, "
          f"{sum(s.status == 200 for s in before)} answered 200; exit {code} after "
          f"{took:.1f}s", flush=True)
    assert len(before) > 20 and all(s.status == 200 for s in before), load.errors[:3]
    assert code == 0 and took <= SHUTDOWN_TIMEOUT_S
