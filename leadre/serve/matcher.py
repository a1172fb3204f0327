"""The latency-sensitive tier: cached generated candidates + ScaNN, never the LLM.

Per request (``MatcherCore.recommend``):

1. read the user's generated candidates from the store; if their S-ID version is the one in
   use, map S-IDs -> ads with the S-ID table and keep the active ones (source ``generated``);
2. fill up to k with the nearest active ads around the generated ones (source ``ann``);
3. on a miss (no record, expired, or an older S-ID version) answer from a real-time ScaNN
   query built from the request's ``recent_events`` plus the user's stored history (source
   ``fallback``), or from the popularity list when there is no signal at all, and enqueue the
   user for asynchronous generation (users with a stored context only: the generator prompts
   from it). Nothing here waits for the generator.

The index is an immutable ``AdIndex`` object; a swap builds the new one off the request path
and replaces the reference, so in-flight requests finish on the old index and no request
fails during a swap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from typing import Any

from leadre.index.ann import AdIndex
from leadre.serve.config import MatcherConfig, ServePaths
from leadre.serve.context import QueryBuilder, merge_events
from leadre.serve.store import open_store

log = logging.getLogger(__name__)

INDEX_META_KEY = "index_dir"


class MatcherCore:
    """Everything the matcher does, in-process (the deployment wraps it; the benchmark and
    unit tests use it directly)."""

    def __init__(self, cfg: MatcherConfig, paths: ServePaths):
        from leadre.sids import load_table

        if paths.index_dir is None:
            raise ValueError("the matcher needs paths.index_dir")
        self.table = load_table(paths.sids_dir)
        self.queries = QueryBuilder(paths.sids_dir)
        self.store = open_store(paths.store_url)
        self.history_events = cfg.history_events
        self.index = AdIndex.load(paths.index_dir)
        self._swap_lock = threading.Lock()

    # --- index swap ---------------------------------------------------------------------

    def swap_index(self, index_dir: str, version: str | None = None) -> dict:
        """Load ``index_dir`` and make it current (a no-op when that directory and
        ``version`` are already in use). Raises, keeping the old index, when the directory is
        not a valid index or was built for other S-IDs. Build each index into a new
        directory: rewriting the one in use under a loading replica is not supported."""
        with self._swap_lock:
            if self.index.location == index_dir and version in (None, self.index.version):
                return self.index_info()
            new = AdIndex.load(index_dir)
            if new.sid_version and new.sid_version != self.table.version:
                raise ValueError(f"index {index_dir} was built for S-ID version "
                                 f"{new.sid_version}, serving uses {self.table.version}")
            if new.info.get("dim", self.queries.dim) != self.queries.dim:
                raise ValueError(f"index {index_dir} has dim {new.info.get('dim')}, "
                                 f"embeddings have {self.queries.dim}")
            old, self.index = self.index, new  # atomic reference swap
            log.info("matcher: index %s -> %s (%d ads)", old.version, new.version, len(new))
            return self.index_info()

    def index_info(self) -> dict:
        ix = self.index
        return {"index_version": ix.version, "index_dir": ix.location, "ads": len(ix),
                "mode": ix.info.get("mode"), "sid_version": self.table.version}

    # --- requests -----------------------------------------------------------------------

    def recommend(self, user_id: str, k: int, recent_events: list[dict] | None = None) -> dict:
        ix = self.index  # one snapshot for the whole request
        rec = self.store.get(user_id)
        picked: list[dict] = []
        seen: set[str] = set()

        def add(ad_id: str, score: float, source: str) -> None:
            if ad_id not in seen and ad_id in ix.active and len(picked) < k:
                seen.add(ad_id)
                picked.append({"ad_id": ad_id, "score": round(float(score), 6), "source": source})

        cache = "miss"
        ctx = None
        model_version = None
        if rec is not None and rec.sid_version == self.table.version:
            cache = "hit"
            model_version = rec.model_version
            for ad_id, score in zip(self.table.ad_ids(rec.sids), rec.scores):
                if ad_id is not None:
                    add(ad_id, score, "generated")
        elif rec is not None:
            cache = "stale"

        basis = "generated"
        if len(picked) < k:
            if cache == "hit" and picked:
                # Expand around what the LLM chose: nearest active ads to their centroid.
                q = self.queries.ad_vectors([p["ad_id"] for p in picked]).mean(axis=0)
                source = "ann"
            else:
                ctx = self.store.get_user(user_id) if cache != "hit" or not picked else None
                events = merge_events(recent_events, (ctx or {}).get("events"),
                                      self.history_events)
                q = self.queries.vector(events) if events else None
                basis = ("recent_events" if recent_events else "history") if q is not None \
                    else "popular"
                source = "ann" if cache == "hit" else "fallback"
            if q is not None:
                for ad_id, score in ix.search(q, k + len(seen)):
                    add(ad_id, score, source)
            if len(picked) < k:  # no signal at all, or a tiny catalog: most popular ads
                for r in ix.popular:
                    add(ix.ad_ids[r], 0.0, source if cache == "hit" else "fallback")
                    if len(picked) >= k:
                        break
        queued = False
        if cache != "hit" and ctx is not None:
            # Only users the store knows: the generator prompts from the stored context, and
            # random ids must not fill the queue.
            queued = self.store.enqueue([user_id]) > 0
        return {"user_id": user_id, "ads": picked, "cache": cache, "basis": basis,
                "queued": queued,
                "versions": {"index": ix.version, "sid": self.table.version,
                             "model": model_version}}


def _deployment():
    from ray import serve
    from ray.serve.metrics import Counter, Gauge, Histogram

    # Sizes and replica options: MatcherConfig, applied with .options() by app.build.
    @serve.deployment(name="Matcher")
    class Matcher:
        """ScaNN matcher replica. ``user_config={"index_dir": ...}`` (``serve deploy``) or
        ``swap_index`` (admin endpoint, broadcast to every replica) changes the index; the
        store remembers the last swapped-in directory so new replicas start on it."""

        async def __init__(self, cfg: MatcherConfig, paths: ServePaths):
            stored = open_store(paths.store_url).get_meta(INDEX_META_KEY)
            current = json.loads(stored)["index_dir"] if stored else paths.index_dir
            try:
                self.core = await asyncio.to_thread(
                    MatcherCore, cfg, dataclasses.replace(paths, index_dir=current))
            except Exception:
                if current == paths.index_dir:
                    raise
                log.exception("matcher: stored index %s unusable, starting on %s", current,
                              paths.index_dir)
                self.core = await asyncio.to_thread(MatcherCore, cfg, paths)
            self.latency = Histogram(
                "leadre_tier_latency_ms", description="latency per serving tier (ms)",
                boundaries=[0.5, 1, 2, 5, 10, 20, 50, 100, 250, 1000], tag_keys=("tier",))
            self.latency.set_default_tags({"tier": "matcher"})
            self.cache = Counter("leadre_cache_lookups_total",
                                 description="candidate-store lookups by result (hit/miss/stale)",
                                 tag_keys=("result",))
            self.sources = Counter("leadre_recommended_ads_total",
                                   description="ads returned, by source", tag_keys=("source",))
            self.queue = Gauge("leadre_generation_queue_depth",
                               description="users waiting for LLM generation")
            self._watch_interval = cfg.watch_interval_s
            self._watch = asyncio.get_running_loop().create_task(self._watch_store())

        async def _watch_store(self) -> None:
            """Follow index swaps made through other replicas; publish the queue depth."""
            while True:
                await asyncio.sleep(self._watch_interval)
                try:
                    raw = await asyncio.to_thread(self.core.store.get_meta, INDEX_META_KEY)
                    target = json.loads(raw) if raw else None
                    if target and target["version"] != self.core.index.version:
                        await asyncio.to_thread(self.core.swap_index, target["index_dir"],
                                                target["version"])
                    self.queue.set(await asyncio.to_thread(self.core.store.queue_depth))
                except Exception:  # a bad directory must not kill the replica
                    log.exception("matcher: store watch failed")

        def _meta(self) -> dict:
            raw = self.core.store.get_meta(INDEX_META_KEY)
            return json.loads(raw) if raw else {}

        def reconfigure(self, user_config: dict[str, Any] | None) -> None:
            """``user_config: {index_dir: ...}`` from ``serve deploy``. The latest operator
            action wins: a user_config value is applied once (and recorded in the store); a
            later admin swap is not undone when replicas restart with the same user_config."""
            index_dir = (user_config or {}).get("index_dir")
            if not index_dir:
                return
            meta = self._meta()
            if meta.get("user_config") == index_dir:
                if meta["version"] != self.core.index.version:
                    self.core.swap_index(meta["index_dir"], meta["version"])
                return
            info = self.core.swap_index(index_dir, "")
            self.core.store.set_meta(INDEX_META_KEY, json.dumps(
                {"index_dir": index_dir, "version": info["index_version"],
                 "user_config": index_dir}))

        async def recommend(self, user_id: str, k: int,
                            recent_events: list[dict] | None = None) -> dict:
            t0 = time.perf_counter()
            out = self.core.recommend(user_id, k, recent_events)
            self.latency.observe((time.perf_counter() - t0) * 1000)
            self.cache.inc(tags={"result": out["cache"]})
            for source in {a["source"] for a in out["ads"]}:
                self.sources.inc(sum(a["source"] == source for a in out["ads"]),
                                 tags={"source": source})
            return out

        async def swap_index(self, index_dir: str, persist: bool = True) -> dict:
            """Swap this replica's index; ``persist`` records it in the store so replicas
            that start later (autoscaling, restarts) and the other replicas follow."""
            info = await asyncio.to_thread(self.core.swap_index, index_dir, "")
            if persist:
                meta = await asyncio.to_thread(self._meta)
                await asyncio.to_thread(self.core.store.set_meta, INDEX_META_KEY, json.dumps(
                    {"index_dir": index_dir, "version": info["index_version"],
                     "user_config": meta.get("user_config")}))
            return info

        async def info(self) -> dict:
            return self.core.index_info()

        async def check_health(self) -> None:
            if self.core.index is None or len(self.core.index) == 0:
                raise RuntimeError("matcher has no index")

    return Matcher


Matcher = _deployment()
