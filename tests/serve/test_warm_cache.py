"""`leadre warm` (ray_jobs/warm_cache.py): Ray Data writes every user's context and generated candidates
(TTL + versions) into the store, in bulk."""

from __future__ import annotations

import time

from leadre.cli import main
from leadre.serve.store import open_store

from serving_world import make_world


def test_warm_cache_job(ray_local, tmp_path):
    w = make_world(tmp_path, ads=300, users=80)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    rc = main(["warm", "--ingest-dir", w["ingest"], "--sids-dir", w["sids"],
                          "--index-dir", w["index"], "--store-url", url, "--generation.batch-size", "32",
                          "--generation.num-cpus", "0.5", "--ttl-s", "600"])
    assert rc == 0
    store = open_store(url)
    from leadre.artifacts import read_table
    from leadre.sids import load_table

    users = read_table(w["ingest"], "users").column("user_id").to_pylist()
    ctx = store.get_users(users)
    assert len(ctx) == len(users)
    some = ctx[users[0]]
    assert some["events"]
    for e in some["events"]:  # ad events carry their category for the long-term facet
        assert set(e) == {"ts", "domain", "action", "ad_id", "title"} | (
            {"category"} if e["domain"] == "ad" else set())
    recs = store.get_many(users)
    assert len(recs) == len(users)  # every synthetic user has events: all are active
    version = load_table(w["sids"]).version
    assert all(r.sid_version == version and r.model_version == "embedding-baseline"
               and len(r.sids) == 20 and time.time() + 500 < r.expires_at < time.time() + 700
               for r in recs.values())
    assert main(["warm", "--generation.num-replicas", "0"]) == 2
