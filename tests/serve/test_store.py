"""Candidate store: the same tests run on the embedded SQLite backend and on a real
`redis-server` started on 127.0.0.1 (skipped with a message when the binary is absent;
scripts/install_redis.sh installs it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from leadre.serve.store import (CandidateRecord, RedisStore, SqliteStore, StoreUnavailable,
                                open_store)

from redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("redis_url")


@pytest.fixture
def store(url):
    s = open_store(url)
    s.clear()
    yield s
    s.clear()
    s.close()


def rec(user: str, n: int = 3, **kw) -> CandidateRecord:
    return CandidateRecord(user, [f"<a_{i}><b_{i}>" for i in range(n)],
                           [float(-i) for i in range(n)], kw.pop("model_version", "m1"),
                           kw.pop("sid_version", "s1"), **kw)


def test_open_store_picks_backend(tmp_path, url):
    s = open_store(url)
    assert isinstance(s, RedisStore if url.startswith("redis") else SqliteStore)
    s.close()
    assert isinstance(open_store(str(tmp_path / "plain.db")), SqliteStore)
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store("mongodb://x")


def test_put_get_roundtrip_with_versions(store):
    r = rec("u1", model_version="sft-abc", sid_version="3f61")
    store.put(r, ttl_s=60)
    got = store.get("u1")
    assert got is not None and got.sids == r.sids and got.scores == r.scores
    assert (got.model_version, got.sid_version) == ("sft-abc", "3f61")
    assert got.expires_at == pytest.approx(time.time() + 60, abs=5)
    assert store.get("nobody") is None
    store.put_many([rec(f"u{i}") for i in range(2, 12)], ttl_s=60)
    many = store.get_many([f"u{i}" for i in range(0, 15)])
    assert sorted(many) == sorted(f"u{i}" for i in range(1, 12))
    assert store.count() == 11
    assert store.delete(["u1", "u2"]) == 2 and store.get("u1") is None


def test_ttl_expires(store):
    store.put(rec("short"), ttl_s=0.3)
    store.put(rec("long"), ttl_s=60)
    assert store.get("short") is not None
    time.sleep(0.6)
    assert store.get("short") is None
    assert store.get("long") is not None
    assert store.count() == 1
    with pytest.raises(ValueError, match="no expires_at"):
        store.put(rec("x"))  # neither a TTL nor an expiry: refuse to cache forever


def test_overwrite_replaces(store):
    store.put(rec("u", n=2, model_version="old"), ttl_s=60)
    store.put(rec("u", n=5, model_version="new"), ttl_s=60)
    got = store.get("u")
    assert got.model_version == "new" and len(got.sids) == 5


def test_user_contexts(store):
    ctx = {"profile": {"age": 31, "city": "Lyon"},
           "events": [{"domain": "video", "action": "play", "title": "badminton"}]}
    store.put_users({"u1": ctx, "u2": {"profile": {}, "events": []}})
    assert store.get_user("u1") == ctx
    assert set(store.get_users(["u1", "u2", "u3"])) == {"u1", "u2"}


def test_meta(store):
    assert store.get_meta("index_dir") is None
    store.set_meta("index_dir", "/a")
    store.set_meta("index_dir", "/b")
    assert store.get_meta("index_dir") == "/b"


def test_queue_dedup_claim_ack_and_lease(store):
    assert store.enqueue(["a", "b", "a"]) == 2
    assert store.enqueue(["b", "c"]) == 1  # already pending users are not queued twice
    assert store.queue_depth() == 3
    first = store.claim(2, lease_s=0.5)
    assert first == ["a", "b"]  # oldest first
    assert store.claim(5, lease_s=0.5) == ["c"]  # claimed users are not handed out again
    assert store.claim(5) == []
    assert store.ack(["a"]) == 1 and store.queue_depth() == 2
    time.sleep(0.7)  # the "worker" holding b and c died: their lease runs out
    assert sorted(store.claim(5)) == ["b", "c"]
    store.ack(["b", "c"])
    assert store.queue_depth() == 0


def test_concurrent_claims_never_hand_out_a_user_twice(url):
    from concurrent.futures import ThreadPoolExecutor

    s0 = open_store(url)
    s0.clear()
    s0.enqueue([f"u{i}" for i in range(200)])
    stores = [open_store(url) for _ in range(4)]

    def worker(s):
        got = []
        while batch := s.claim(7, lease_s=60):
            got += batch
        return got

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(worker, stores))
    flat = [u for r in results for u in r]
    assert len(flat) == 200 and len(set(flat)) == 200
    for s in stores:
        s.close()
    s0.clear()
    s0.close()


_WRITER = """
import os, signal, sys
from leadre.serve.store import CandidateRecord, open_store
s = open_store(sys.argv[1])
s.put(CandidateRecord("durable", ["<a_1><b_2>"], [0.0], "m", "s"), ttl_s=3600)
s.enqueue(["pending-user"])
s.put_users({"durable": {"profile": {"age": 40}, "events": []}})
os.kill(os.getpid(), signal.SIGKILL)  # no close(), no clean shutdown
"""


def test_survives_a_killed_writer_process(url):
    """Durable across an app restart: a process writes and is SIGKILLed; a new one reads."""
    s = open_store(url)
    s.clear()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", _WRITER, url], env=env, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    s2 = open_store(url)
    assert s2.get("durable").sids == ["<a_1><b_2>"]
    assert s2.claim(10) == ["pending-user"]
    assert s2.get_user("durable")["profile"]["age"] == 40
    s2.clear()
    s.close()
    s2.close()


def test_live_ad_status(store, url):
    """Ads switched off (and back on) after the index was built: a versioned set that every
    matcher replica polls; another connection (another replica) sees each change at once."""
    other = open_store(url)
    assert store.ads_status_version() == 0 and store.inactive_ads() == (0, set())
    v1 = store.set_ads_active(["ad1", "ad2", "ad2"], False)
    assert v1 == 1 and other.inactive_ads() == (1, {"ad1", "ad2"})
    v2 = other.set_ads_active(["ad1", "never-off"], True)
    assert v2 == 2 and store.ads_status_version() == 2
    assert store.inactive_ads() == (2, {"ad2"})
    assert store.set_ads_active([], False) == 3  # an empty change still bumps the version
    store.clear()
    assert store.inactive_ads() == (0, set())
    other.close()


def test_redis_store_fails_fast_while_down_and_reconnects(tmp_path):
    """A stopped Redis raises StoreUnavailable (the matcher's cue to fall back), and at once
    while the back-off lasts; once the server is back the same store object reads again,
    with no reopening (the append-only file kept the data)."""
    server = RedisServer(tmp_path)
    server.start()
    s = open_store(server.url)
    try:
        s.put(rec("a"), ttl_s=60)
        server.stop()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            s.get("a")
        t0 = time.perf_counter()
        with pytest.raises(StoreUnavailable, match="next try in"):
            s.get_many(["a"])
        assert time.perf_counter() - t0 < 0.05  # no connect attempt in the back-off
        server.start()
        time.sleep(s.retry_after_s)
        assert s.get("a").sids == rec("a").sids
    finally:
        s.close()
        server.stop()
