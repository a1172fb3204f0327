"""Serving faults under steady load, over real HTTP on 127.0.0.1: a real Ray Serve graph (two
Matcher replicas -> Generator) on the session's local Ray cluster, a real ScaNN index, a real
SQLite store, and for the Redis test a real ``redis-server``. A bounded client
(:class:`load_client.Load`) sends requests for the whole test; each test prints what it did and
what it counted (requests sent, failed, p50 / p99 latency during the fault)."""

from __future__ import annotations

import time

import pytest

from leadre.artifacts import read_table
from leadre.model.config import GenerationConfig
from leadre.serve import GeneratorConfig, MatcherConfig, ServeConfig
from leadre.index.context import user_contexts
from leadre.serve.store import CandidateRecord, open_store
from leadre.sids import load_table

from conftest import free_port
from load_client import Load, replica_actors, wait_http
from redis_server import redis  # noqa: F401 - the module-scoped fixture
from serving_world import make_world

APP = "faults"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    w = make_world(root, ads=400, users=150)
    w["store"] = f"sqlite:///{root / 'store.db'}"
    w["contexts"] = user_contexts(w["ingest"], max_events=50)
    ads = read_table(w["ingest"], "ads")
    w["active"] = sorted(ads.filter(ads.column("active")).column("ad_id").to_pylist())
    with open_store(w["store"]) as store:
        store.put_users(w["contexts"])
    return w


def config(world, store_url: str, matchers: int = 2, **generator) -> ServeConfig:
    """Two matcher replicas, and a generator taking one user at a time: slow enough that the
    queue still holds users when it dies or the app stops (what the faults are about). The
    store deadline is generous: on 2 shared cores a healthy read can take 10 ms to be
    scheduled, and these tests tell hits from fallbacks (the freeze test sets its own)."""
    return ServeConfig(
        index_dir=world["index"], sids_dir=world["sids"], store_url=store_url,
        matcher=MatcherConfig(num_cpus=0.05, num_replicas=matchers, health_check_period_s=1.0,
                              store_deadline_ms=250.0),
        generator=GeneratorConfig(
            generation=GenerationConfig(num_gpus=0, num_cpus=0.05, batch_size=1),
            **{"poll_interval_s": 0.2, "lease_s": 3.0, "health_check_period_s": 1.0,
               **generator}))


def deploy(cfg: ServeConfig, name: str, prefix: str, base: str) -> str:
    from ray import serve

    from leadre.serve.app import build

    serve.run(build(cfg), name=name, route_prefix=prefix, blocking=False)
    url = base + prefix.rstrip("/")
    wait_http(f"{url}/healthz")
    return url


@pytest.fixture(scope="module")
def http(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def app(http, world):
    return deploy(config(world, world["store"]), APP, "/", http)


def wait_replicas(ray, app: str, deployment: str, n: int, not_ids: set[str],
                  timeout: float = 90) -> float:
    """Seconds until ``n`` healthy replicas of ``deployment`` run, none of them ``not_ids``."""
    from ray import serve

    t0 = time.time()
    while time.time() - t0 < timeout:
        now = replica_actors(ray, app, deployment)
        status = serve.status().applications[app].deployments[deployment].status
        if len(now) == n and not {i for _, i in now} & not_ids and status == "HEALTHY":
            return time.time() - t0
        time.sleep(0.5)
    pytest.fail(f"{deployment} did not come back to {n} healthy replicas in {timeout}s")


def test_killing_one_of_two_matcher_replicas_fails_no_request(app, world, ray_local):
    import ray

    before = replica_actors(ray, APP, "Matcher")
    assert len(before) == 2, before
    users = list(world["contexts"])[:50] + [f"anon-{i}" for i in range(20)]
    # The client retries a connection error, a 5xx or a 2 s timeout (``/recommend`` is
    # idempotent): the requests the dead replica held are answered by the other one.
    with Load(app, users, threads=4, retries=2, timeout_s=2.0) as load:
        time.sleep(2)
        t_kill = time.time()
        ray.kill(ray.get_actor(before[0][0], namespace="serve"), no_restart=True)
        back_s = wait_replicas(ray, APP, "Matcher", 2, {before[0][1]})
        t_back = time.time()
        time.sleep(1)
    # The window starts a second early: requests in flight when the replica died count.
    out = load.report(f"killed matcher replica {before[0][0]}; replaced after {back_s:.1f}s",
                      t_kill - 1, t_back)
    assert load.total > 50 and out["fault_window_requests"] > 10
    assert load.failed == 0, (load.codes, load.errors[:3])


def _queue_users(store, world, prefix: str, n: int) -> list[str]:
    """``n`` users with real contexts (copies of the world's), queued for generation the
    way the matcher queues misses."""
    contexts = list(world["contexts"].values())
    users = [f"{prefix}-{i}" for i in range(n)]
    store.put_users({u: contexts[i % len(contexts)] for i, u in enumerate(users)})
    store.enqueue(users)
    return users


def test_killing_the_generator_loses_nothing_from_the_queue(app, world, ray_local):
    """0 failed requests while the generator is dead; the users queued when it died (those
    it had claimed mid-batch included, whose lease runs out) are all generated by its
    replacement, and the queue drains to 0."""
    import ray

    before = replica_actors(ray, APP, "Generator")
    assert len(before) == 1, before
    store = open_store(world["store"])
    queued = _queue_users(store, world, "gen-kill", 1500)
    users = list(world["contexts"])[:60] + [f"anon-g{i}" for i in range(20)]
    with Load(app, users, threads=3) as load:
        time.sleep(0.7)  # it is draining the queue now
        t_kill = time.time()
        ray.kill(ray.get_actor(before[0][0], namespace="serve"), no_restart=True)
        depth_at_kill = store.queue_depth()
        back_s = wait_replicas(ray, APP, "Generator", 1, {before[0][1]})
        t_back = time.time()
        time.sleep(1)
    out = load.report(f"killed generator {before[0][0]} with {depth_at_kill} users queued; "
                      f"replaced after {back_s:.1f}s", t_kill, t_back)
    assert load.total > 50 and out["fault_window_requests"] > 10
    assert load.failed == 0, (load.codes, load.errors[:3])
    assert depth_at_kill > 0, "the generator had drained the queue before it was killed"
    deadline = time.time() + 90
    while store.queue_depth() and time.time() < deadline:
        time.sleep(0.5)
    drained_s = time.time() - t_back
    done = store.get_many(queued)
    print(f"[generator kill] queue drained {drained_s:.1f}s after the restart; "
          f"{len(done)}/{len(queued)} queued users have candidates", flush=True)
    assert store.queue_depth() == 0 and len(done) == len(queued)
    assert {r.model_version for r in done.values()} == {"embedding-baseline"}
    store.close()


def test_app_restart_on_the_same_store_keeps_candidates_and_queue(app, http, world):
    """``serve.delete`` + ``serve.run`` of the whole application on the same SQLite store:
    the candidates cached before are hits right after the restart (before any generation),
    and the users still queued at the stop are generated after it."""
    from ray import serve

    store = open_store(world["store"])
    cached = sorted(store.get_many(list(world["contexts"])))[:30]
    assert len(cached) >= 10, "earlier tests left too few generated users"
    queued = _queue_users(store, world, "restart", 3000)
    time.sleep(0.5)
    t_stop = time.time()
    serve.delete(APP)
    depth_at_stop = store.queue_depth()
    waiting = set(queued) - set(store.get_many(queued))
    t_up0 = time.time()
    deploy(config(world, world["store"]), APP, "/", http)
    t_up = time.time()
    with Load(app, cached, threads=3) as load:
        time.sleep(2)
    load.report(f"app stopped with {depth_at_stop} users queued; down "
                      f"{t_up - t_stop:.1f}s (redeploy {t_up - t_up0:.1f}s)")
    assert depth_at_stop > 0 and waiting, "the generator had drained the queue before the stop"
    assert load.failed == 0 and load.total > 20, (load.codes, load.errors[:3])
    # The first answers after the restart are the cached candidates.
    first = {}
    for s in sorted(load.log, key=lambda s: s.t):
        first.setdefault(s.body["user_id"], s.body["cache"])
    assert set(first) == set(cached) and set(first.values()) == {"hit"}, first
    deadline = time.time() + 90
    while store.queue_depth() and time.time() < deadline:
        time.sleep(0.5)
    done = store.get_many(sorted(waiting))
    print(f"[app restart] {len(done)}/{len(waiting)} users queued at the stop generated "
          f"{time.time() - t_up:.1f}s after the restart", flush=True)
    assert store.queue_depth() == 0 and len(done) == len(waiting)
    assert min(r.created_at for r in done.values()) > t_stop
    store.close()


def _cached_users_in(store_url: str, world, n: int = 40) -> list[str]:
    """``n`` users with contexts and cached candidates in a cleared store."""
    table = load_table(world["sids"])
    hits, ads = list(world["contexts"])[:n], world["active"]
    with open_store(store_url) as store:
        store.clear()
        store.put_users({u: world["contexts"][u] for u in hits})
        store.put_many([CandidateRecord(u, table.sids(ads[i % 50:i % 50 + 5]), [0.0] * 5,
                                        "test-model", table.version) for i, u in enumerate(hits)],
                       ttl_s=3600)
    return hits


def test_redis_restart_degrades_to_fallback_and_reconnects(http, world, redis, ray_local):
    """The production store stops (SIGTERM) under load and comes back 4 s later on the same
    port and data: meanwhile requests are answered from the ANN fallback (cache
    ``unavailable``), none fails; afterwards the same replicas read the store again (cached
    users are hits) without a restart."""
    from ray import serve

    hits = _cached_users_in(redis.url, world)
    url = deploy(config(world, redis.url, matchers=1), "faults-redis", "/redis", http)
    try:
        with Load(url, hits, threads=3) as load:
            time.sleep(2)
            t_stop = time.time()
            redis.stop()
            time.sleep(4)
            t_start = time.time()
            redis.start()
            time.sleep(4)
        out = load.report("redis-server stopped for 4 s and restarted", t_stop, t_start)
        assert load.failed == 0 and out["fault_window_requests"] > 20, \
            (load.codes, load.errors[:3])
        during = [s.body for s in load.between(t_stop + 0.2, t_start)]
        assert during and {b["cache"] for b in during} == {"unavailable"}
        assert {a["source"] for b in during for a in b["ads"]} == {"fallback"}
        before = [s.body for s in load.between(0, t_stop - 0.5)]  # answered before the stop
        assert before and {b["cache"] for b in before} == {"hit"}
        again = [s for s in load.log if s.t > t_start and s.body["cache"] == "hit"]
        assert again, "the store never came back"
        reconnect_s = min(s.t for s in again) - t_start
        tail = [s.body["cache"] for s in load.between(t_start + reconnect_s + 1, float("inf"))]
        print(f"[redis restart] {len(during)} answers from the fallback while it was down; "
              f"hits again {reconnect_s:.2f}s after it was back", flush=True)
        assert tail and set(tail) == {"hit"} and reconnect_s < 3
    finally:
        serve.delete("faults-redis")


def test_frozen_redis_costs_a_request_no_more_than_its_deadline(http, world, redis, ray_local):
    """redis-server frozen with SIGSTOP under load (its socket stays open and silent, the
    worst case: without a deadline each read would wait the 2 s socket timeout): the store
    reads run off the event loop under ``store_deadline_ms``, so requests are answered from
    the ANN fallback within that budget plus the usual ANN time, and none fails; after
    SIGCONT the hits come back."""
    import os
    import signal

    from ray import serve

    deadline_ms = 10.0
    hits = _cached_users_in(redis.url, world)
    cfg = config(world, redis.url, matchers=1)
    cfg.matcher.store_deadline_ms = deadline_ms
    url = deploy(cfg, "faults-freeze", "/freeze", http)
    try:
        with Load(url, hits, threads=3, timeout_s=5.0) as load:
            time.sleep(3)
            t_stop = time.time()
            os.kill(redis.proc.pid, signal.SIGSTOP)
            time.sleep(4)
            t_cont = time.time()
            os.kill(redis.proc.pid, signal.SIGCONT)
            time.sleep(4)
        before = load.report("before the freeze", t_stop - 2.5, t_stop)
        during = load.report(f"redis-server frozen (SIGSTOP) for 4 s, deadline {deadline_ms} ms",
                             t_stop, t_cont)
        assert load.failed == 0 and during["fault_window_requests"] > 20, \
            (load.codes, load.errors[:3])
        # sent while frozen and answered before SIGCONT (a read may win the last 10 ms)
        window = load.between(t_stop + 0.1, t_cont - 0.1)
        assert {s.body["cache"] for s in window} == {"unavailable"}
        assert during["p99_ms"] <= before["p99_ms"] + deadline_ms + 100, (before, during)
        again = [s for s in load.log if s.t > t_cont and s.body["cache"] == "hit"]
        assert again, "the store never came back"
        print(f"[redis freeze] p99 {before['p99_ms']} ms before, {during['p99_ms']} ms frozen "
              f"(max {during['max_ms']} ms); hits again "
              f"{min(s.t for s in again) - t_cont:.2f}s after SIGCONT", flush=True)
    finally:
        if redis.proc is not None:
            os.kill(redis.proc.pid, signal.SIGCONT)
        serve.delete("faults-freeze")
