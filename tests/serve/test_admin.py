"""The admin routes, secure by default, over real HTTP on 127.0.0.1: a real Ray Serve graph
(two Matcher replicas -> Generator) with ``matcher.admin_port`` set, plus the ``Admin``
application (one replica, its own HTTP server on the admin port), a real ScaNN index and a real
SQLite store.

- The public port answers 404 for /admin/*, even with the right token.
- The admin port: missing or wrong token -> 401; the right one -> 200, and the ad it switches
  off leaves every matcher replica's answers at once (and comes back when switched on); an
  index swap there reaches both replicas, a bad directory is refused with 400.
- The token is a file (a mounted Secret) read at each request: replacing it rotates the token
  without a redeploy; a missing file refuses every call (403), with no fallback.
- The token is never in the replicas' init arguments: ``app.build`` does not resolve it.

The token resolution itself (``MatcherConfig.token``) is also tested without Ray. Marked
``slow``: the same through ``leadre serve`` in Serve's high-throughput mode, ended by SIGTERM.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import httpx
import pytest

from leadre.index import AdIndex
from leadre.serve import GeneratorConfig, MatcherConfig, ServeConfig
from leadre.serve.config import serving_generation

from conftest import free_port, kill_session
from load_client import wait_http
from serving_world import make_world

APP = "leadre-admin-test"


# --- the token: resolved in the replica, at each request (no Ray) -------------------------

def write_token(path, token: str) -> None:
    """Replace ``path`` the way the kubelet updates a Secret volume: a new file swapped in
    atomically (a new inode), never an in-place write."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(token + "\n")
    os.replace(tmp, path)


def test_token_file_is_reread_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.delenv("LEADRE_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("LEADRE_ADMIN_TOKEN_FILE", raising=False)
    path = tmp_path / "token"
    write_token(path, "first-token")
    cfg = MatcherConfig(admin_token_file=str(path))
    assert cfg.token() == "first-token"
    write_token(path, "second-token")  # same size, same second: the inode tells
    assert cfg.token() == "second-token"
    path.unlink()  # fail closed: no token, no fallback to the last one or the environment
    monkeypatch.setenv("LEADRE_ADMIN_TOKEN", "env-token")
    assert cfg.token() is None
    write_token(path, "   ")
    assert cfg.token() is None  # an empty file is no token


def test_token_sources_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv("LEADRE_ADMIN_TOKEN_FILE", raising=False)
    monkeypatch.delenv("LEADRE_ADMIN_TOKEN", raising=False)
    assert MatcherConfig().token() is None  # nothing configured: the routes answer 403
    monkeypatch.setenv("LEADRE_ADMIN_TOKEN", "env-token")
    assert MatcherConfig().token() == "env-token"  # read now, in the calling process
    path = tmp_path / "token"
    write_token(path, "file-token")
    monkeypatch.setenv("LEADRE_ADMIN_TOKEN_FILE", str(path))
    assert MatcherConfig().token() == "file-token"  # the file (it can rotate) wins
    assert MatcherConfig(admin_token="literal").token() == "literal"  # tests / local use


def test_build_does_not_bake_the_token_into_init_args(tmp_path, monkeypatch):
    """``app.build`` used to resolve $LEADRE_ADMIN_TOKEN on the driver and ship it in the
    Matcher's init arguments; now the replicas resolve it, so the arguments hold none."""
    from leadre.serve.app import build, build_admin

    monkeypatch.setenv("LEADRE_ADMIN_TOKEN", "driver-secret")
    cfg = ServeConfig(index_dir=str(tmp_path / "index"), sids_dir=str(tmp_path / "sids"),
                      store_url=f"sqlite:///{tmp_path / 'store.db'}",
                      matcher=MatcherConfig(admin_port=free_port()))
    matcher = build(cfg)._bound_deployment
    assert matcher.init_args[0].admin_token is None
    assert "driver-secret" not in repr(matcher.init_args)
    admin = build_admin(cfg)._bound_deployment
    assert admin.name == "Admin" and admin.init_args[0].admin_token is None
    assert "driver-secret" not in repr(admin.init_args)


# --- over real HTTP ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from leadre.index.context import user_contexts
    from leadre.serve.store import open_store

    root = tmp_path_factory.mktemp("admin")
    w = make_world(root, ads=400, users=100)
    w["store"] = f"sqlite:///{root / 'store.db'}"
    store = open_store(w["store"])
    store.put_users(user_contexts(w["ingest"], max_events=50))
    store.close()
    w["token_file"] = root / "secret" / "token"
    w["token_file"].parent.mkdir()
    write_token(w["token_file"], "admin-token-1")
    return w


@pytest.fixture(scope="module")
def server(ray_local, world):
    """The graph on a public port, the Admin application on its own port (as production.yaml
    deploys them), the token from a file."""
    from ray import serve

    from leadre.serve.app import admin_app_name, build, build_admin

    port, admin_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(index_dir=world["index"], sids_dir=world["sids"], store_url=world["store"],
                      app_name=APP,
                      matcher=MatcherConfig(num_cpus=0.05, num_replicas=2,
                                            admin_port=admin_port, admin_host="127.0.0.1",
                                            admin_token_file=str(world["token_file"])),
                      generator=GeneratorConfig(
                          generation=replace(serving_generation(), num_gpus=0, num_cpus=0.05),
                          poll_interval_s=0.2))
    serve.run(build(cfg), name=APP, route_prefix="/", blocking=False)
    serve.run(build_admin(cfg), name=admin_app_name(cfg), route_prefix=None, blocking=False)
    public, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    wait_http(f"{public}/healthz")
    wait_http(f"{admin}/healthz")
    yield {"public": public, "admin": admin}
    serve.shutdown()


@pytest.fixture(scope="module")
def public(server):
    with httpx.Client(base_url=server["public"], timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def admin(server):
    with httpx.Client(base_url=server["admin"], timeout=60) as c:
        yield c


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


def popular(public, k: int = 10) -> list[str]:
    r = public.post("/recommend", json={"user_id": "anon-admin-test", "k": k})
    assert r.status_code == 200, r.text
    return [a["ad_id"] for a in r.json()["ads"]]


def matcher_infos() -> list[dict]:
    from ray import serve

    return serve.get_deployment_handle("Matcher", APP).broadcast("info").results(timeout_s=30)


def test_public_port_has_no_admin_routes(server, public, world):
    token = world["token_file"].read_text().strip()
    for path, body in (("/admin/ads", {"ad_ids": ["x"], "active": False}),
                       ("/admin/index", {"index_dir": world["index"]})):
        for headers in ({}, bearer(token)):
            r = public.post(path, json=body, headers=headers)
            assert r.status_code == 404, (path, r.status_code, r.text)
    assert public.get("/healthz").status_code == 200
    # ... and the admin port serves nothing but the admin routes.
    assert httpx.post(f"{server['admin']}/recommend", json={"user_id": "u1"}).status_code == 404


def test_admin_port_switches_an_ad_off_on_every_replica(public, admin, world):
    token = world["token_file"].read_text().strip()
    victim = popular(public)[0]  # in every answer to an anonymous user
    body = {"ad_ids": [victim], "active": False}
    assert admin.post("/admin/ads", json=body).status_code == 401  # no token
    assert admin.post("/admin/ads", json=body, headers=bearer("wrong")).status_code == 401
    assert admin.post("/admin/ads", json={"ad_ids": [], "active": False},
                      headers=bearer(token)).status_code == 422
    assert victim in popular(public)  # nothing changed by the refused calls

    r = admin.post("/admin/ads", json=body, headers=bearer(token))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["replicas"] == 2 and out["ads_switched_off"] == 1 and out["active"] is False
    # Every answer after the call, from either replica, leaves it out.
    for _ in range(20):
        assert victim not in popular(public)
    assert [i["ads_switched_off"] for i in matcher_infos()] == [1, 1]

    r = admin.post("/admin/ads", json={"ad_ids": [victim], "active": True},
                   headers=bearer(token))
    assert r.status_code == 200 and r.json()["ads_switched_off"] == 0
    assert popular(public)[0] == victim


def test_admin_port_swaps_the_index_on_every_replica(public, admin, world):
    token = world["token_file"].read_text().strip()
    r = admin.post("/admin/index", json={"index_dir": world["sids"]}, headers=bearer(token))
    assert r.status_code == 400 and "rejected" in r.json()["error"], r.text
    before = public.get("/healthz").json()["index_version"]
    r = admin.post("/admin/index", json={"index_dir": world["index"]}, headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.json()["replicas"] == 2
    assert r.json()["index_version"] == before == AdIndex.load(world["index"]).version
    assert {i["index_version"] for i in matcher_infos()} == {before}


def test_token_rotates_without_a_redeploy(public, admin, world):
    """The Secret is replaced (as the kubelet does for a mounted Secret): the next request is
    checked against the new token, on the same replica, with no redeploy or restart."""
    replica = admin.get("/healthz").json()["replica"]
    old = world["token_file"].read_text().strip()
    body = {"ad_ids": ["no-such-ad"], "active": True}
    assert admin.post("/admin/ads", json=body, headers=bearer(old)).status_code == 200
    try:
        write_token(world["token_file"], "admin-token-2")
        r = admin.post("/admin/ads", json=body, headers=bearer(old))
        assert r.status_code == 401, r.text
        assert admin.post("/admin/ads", json=body,
                          headers=bearer("admin-token-2")).status_code == 200
        # A missing Secret file: every call refused (no fallback), until it is back.
        world["token_file"].unlink()
        for headers in (bearer(old), bearer("admin-token-2"), {}):
            assert admin.post("/admin/ads", json=body, headers=headers).status_code == 403
    finally:
        write_token(world["token_file"], old)
    deadline = time.time() + 10
    while admin.post("/admin/ads", json=body, headers=bearer(old)).status_code != 200:
        assert time.time() < deadline
        time.sleep(0.2)
    assert admin.get("/healthz").json()["replica"] == replica  # the same replica all along


def test_without_admin_port_the_replica_reads_its_own_environment(server, public, world):
    """``admin_port`` unset: the admin routes stay on the public port (as before), and the
    matcher replica takes the token from its *own* environment ($LEADRE_ADMIN_TOKEN_FILE in
    the node's environment, here the replica's runtime_env), not from the driver's."""
    from ray import serve

    from leadre.serve.app import tier
    from leadre.serve.matcher import Matcher

    cfg = ServeConfig(index_dir=world["index"], sids_dir=world["sids"], store_url=world["store"],
                      matcher=MatcherConfig(num_cpus=0.05))
    assert cfg.matcher.token() is None  # nothing on the driver
    env = {"LEADRE_ADMIN_TOKEN_FILE": str(world["token_file"])}
    app = tier(Matcher, cfg.matcher, {"ray_actor_options": {
        "num_cpus": 0.05, "runtime_env": {"env_vars": env}}}).bind(cfg.matcher, cfg.paths())
    serve.run(app, name="admin-on-public-port", route_prefix="/solo", blocking=False)
    try:
        wait_http(f"{server['public']}/solo/healthz")
        token = world["token_file"].read_text().strip()
        body = {"ad_ids": ["no-such-ad"], "active": True}
        assert public.post("/solo/admin/ads", json=body).status_code == 401
        r = public.post("/solo/admin/ads", json=body, headers=bearer(token))
        assert r.status_code == 200 and r.json()["replicas"] == 1, r.text
    finally:
        serve.delete("admin-on-public-port")


@pytest.mark.slow
def test_leadre_serve_in_high_throughput_mode_puts_admin_on_its_own_port(world, tmp_path):
    """`leadre serve --set matcher.admin_port=...` as shipped: its own cluster in Serve's
    high-throughput mode (HAProxy, user code on the replica's event loop), the token file
    named by the environment of the cluster (not passed as an argument). Public /admin/* ->
    404, the admin port -> 401 / 200, then SIGTERM stops everything, the admin port included."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    port, admin_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(LEADRE_ADMIN_TOKEN_FILE=str(world["token_file"]), RAY_USAGE_STATS_ENABLED="0",
               RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
               RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()))
    env.pop("LEADRE_ADMIN_TOKEN", None)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "leadre"), "serve", "--index-dir", world["index"],
         "--sids-dir", world["sids"], "--store-url", world["store"], "--port", str(port),
         "--set", "ray.num_cpus=2", "--set", "ray.object_store_mb=200",
         "--set", "matcher.num_cpus=0.1", "--set", "generator.generation.num_cpus=0.1",
         "--set", "generator.generation.num_gpus=0", "--set", f"matcher.admin_port={admin_port}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    public, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    try:
        deadline = time.time() + 240
        while "LEADRE serving at" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "leadre serve did not come up"
            time.sleep(1)
        token = world["token_file"].read_text().strip()
        body = {"ad_ids": ["no-such-ad"], "active": True}
        assert httpx.post(f"{public}/admin/ads", json=body,
                          headers=bearer(token)).status_code == 404
        assert httpx.post(f"{admin}/admin/ads", json=body).status_code == 401
        r = httpx.post(f"{admin}/admin/ads", json=body, headers=bearer(token), timeout=30)
        assert r.status_code == 200 and r.json()["replicas"] == 1, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{admin}/healthz", timeout=5)
    finally:
        kill_session(proc.pid)  # anything of its cluster still alive
        log.close()
