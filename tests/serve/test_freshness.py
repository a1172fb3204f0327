"""What a cache hit does with news, in-process on real components (a real ScaNN index, real
S-IDs, a real SQLite store; a real redis-server for the queue-order test): fresh intent
(request events newer than the candidates' basis), model rollouts (candidates of a replaced
model) and the generation queue's priority lane."""

from __future__ import annotations

import time

import pytest

from leadre.artifacts import read_table
from leadre.index.context import user_contexts
from leadre.serve.config import ServePaths
from leadre.serve.matching import MatcherCore, newer_events
from leadre.serve.store import CandidateRecord, open_store
from leadre.sids import load_table

from redis_server import redis  # noqa: F401 - the module-scoped fixture
from serving_world import make_world

K = 10


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh")
    w = make_world(root, ads=400, users=120)
    ads = read_table(w["ingest"], "ads").to_pandas()
    ads = ads[ads.active]
    w["category"] = dict(zip(ads.ad_id, ads.category))
    w["by_category"] = {c: sorted(g.ad_id) for c, g in ads.groupby("category")}
    w["contexts"] = user_contexts(w["ingest"], max_events=50)
    w["store"] = f"sqlite:///{root / 'store.db'}"
    return w


def _cached_world(world, model_version: str = "model-a") -> tuple[MatcherCore, dict]:
    """Every user holds 20 generated candidates from their own top category, built from
    their stored history (basis = their newest event); returns the core and, per user, a
    category they never engaged with."""
    table = load_table(world["sids"])
    store = open_store(world["store"])
    store.clear()
    store.put_users(world["contexts"])
    other: dict[str, str] = {}
    recs = []
    for u, ctx in world["contexts"].items():
        cats = [c for c, _ in ctx["categories"]] or sorted(world["by_category"])[:1]
        top = cats[0] if cats[0] in world["by_category"] else sorted(world["by_category"])[0]
        other[u] = next(c for c in sorted(world["by_category"]) if c not in cats)
        basis = max(e["ts"] for e in ctx["events"])
        recs.append(CandidateRecord(u, table.sids(world["by_category"][top][:20]), [0.0] * 20,
                                    model_version, table.version, basis_ts=basis))
    store.put_many(recs, ttl_s=3600)
    store.close()
    core = MatcherCore(ServePaths(sids_dir=world["sids"], store_url=world["store"],
                                  index_dir=world["index"]).absolute())
    return core, other


def _clicks(world, category: str, ts: float | None) -> list[dict]:
    return [{"ts": ts, "domain": "ad", "action": "click", "ad_id": a, "title": None}
            for a in world["by_category"][category][:3]]


def test_fresh_events_reach_the_answer_of_a_cache_hit(world):
    """A hit whose request carries newer clicks in a category the user never touched: with
    fresh intent on, the answer shows that category (measured over every user), the rest is
    still the LLM's, and the user is queued again; with it off, the cached answer ignores
    them."""
    core, other = _cached_world(world)
    now = time.time()
    shares = {}
    for fresh_share in (0.3, 0.0):
        core.fresh_share = fresh_share
        reflect, generated, queued = 0, 0, 0
        for u in world["contexts"]:
            out = core.recommend(u, K, _clicks(world, other[u], now))
            assert out["cache"] == "hit"
            cats = [world["category"][a["ad_id"]] for a in out["ads"]]
            reflect += other[u] in cats
            generated += sum(a["source"] == "generated" for a in out["ads"])
            queued += out["queued"]
        n = len(world["contexts"])
        shares[fresh_share] = reflect / n
        print(f"[fresh intent] fresh_share={fresh_share}: {reflect}/{n} answers reflect the "
              f"request's newer events; {generated / n:.1f} of {K} ads generated; "
              f"{queued} users queued again", flush=True)
        if fresh_share:
            assert generated / n >= K * (1 - fresh_share) - 0.5 and queued == n
    assert shares[0.3] >= 0.95 and shares[0.0] <= 0.1


def test_events_older_than_the_basis_are_not_fresh(world):
    core, other = _cached_world(world)
    u = next(iter(world["contexts"]))
    basis = max(e["ts"] for e in world["contexts"][u]["events"])
    out = core.recommend(u, K, _clicks(world, other[u], basis - 60))
    assert out["cache"] == "hit" and out["fresh_events"] == 0 and not out["queued"]
    assert {a["source"] for a in out["ads"]} == {"generated"}
    assert newer_events([{"ts": None}, {"ts": 5.0}, {"ts": 9.0}], 5.0) == [{"ts": None},
                                                                         {"ts": 9.0}]


def test_candidates_of_a_replaced_model_are_served_and_queued_first(world):
    core, _ = _cached_world(world, model_version="model-a")
    u = next(iter(world["contexts"]))
    core.model_version = "model-a"
    out = core.recommend(u, K)
    assert out["cache"] == "hit" and not out["queued"] and not out["priority"]
    core.model_version = "model-b"  # rolled out: the store's meta says so
    out = core.recommend(u, K)
    assert out["cache"] == "hit" and out["versions"]["model"] == "model-a"
    assert {a["source"] for a in out["ads"]} == {"generated"}  # still served meanwhile
    assert out["queued"] and out["priority"]
    with open_store(world["store"]) as store:
        assert sorted(store.users_not_of_model("model-b")) == sorted(world["contexts"])
        assert store.users_not_of_model("model-a") == []


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_priority_users_are_claimed_before_older_entries(backend, tmp_path, request):
    url = (request.getfixturevalue("redis").url if backend == "redis"
           else f"sqlite:///{tmp_path / 'q.db'}")
    with open_store(url) as store:
        store.clear()
        assert store.enqueue(["old1", "old2"]) == 2
        time.sleep(0.01)
        assert store.enqueue(["new1"]) == 1
        # one already queued (moved ahead), one new
        assert store.enqueue(["new1", "vip"], priority=True) == 1
        assert store.queue_depth() == 4
        first = store.claim(2)
        assert sorted(first) == ["new1", "vip"]
        assert store.claim(2) == ["old1", "old2"]
