"""The latency-sensitive tier, and the HTTP ingress of the graph: FastAPI through
``serve.ingress``, answering from :class:`~leadre.serve.matching.MatcherCore` in-process.

    HTTP ──> Matcher (validate, store read, ScaNN, JSON) ──fire-and-forget──> Generator

A request takes no deployment hop: every hop costs a few milliseconds of CPU on both sides
(serialisation, routing, an event-loop round trip), more than the matching itself. Cache
misses are queued for generation off the request path (one store write per
``enqueue_interval_s``), and the Generator is woken with one fire-and-forget call at a time;
nothing here waits for it.

Routes: ``POST /recommend``, ``GET /healthz``, ``POST /admin/index`` (swap the index on every
replica), ``POST /admin/ads`` (switch ads off/on on every replica, no rebuild),
``POST /admin/ads/new`` (add ads new to the catalog, no retraining), ``POST /admin/model``
(roll out a new model to the generators); the admin routes answer 404 here
when ``matcher.admin_port`` moves them to the ``Admin`` deployment's own port
(:mod:`leadre.serve.admin`). The request models and limits are in :mod:`leadre.serve.api`.
Overload is shed with 503 by Serve itself (``max_queued_requests``), never a hang.

Store reads run in a thread pool under ``store_deadline_ms`` and titles the encoder has not
seen are encoded in a thread: the event loop never waits on either.

Background loops per replica: the live ad status (every ``ad_status_interval_s``), index swaps
made through other replicas, the rolled-out model's version and the queue depth (every
``watch_interval_s``).
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class on
# the methods that serve.ingress rewrites.
import asyncio
import dataclasses
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError
from ray import serve

from leadre.index.context import merge_events
from leadre.serve import api
from leadre.serve.config import MatcherConfig, ServePaths
from leadre.serve.generator import CATALOG_META_KEY, MODEL_META_KEY, start_rollout
from leadre.serve.matching import UNAVAILABLE, MatcherCore, newer_events
from leadre.serve.metrics import MATCHER_BUCKETS_MS, counter, gauge, tier_latency
from leadre.serve.store import StoreUnavailable, open_store

log = logging.getLogger(__name__)

INDEX_META_KEY = "index_dir"

app = FastAPI(title="LEADRE recommendations", version="2.0",
              description="Two-tier LLM ad retrieval: cached LLM candidates + ScaNN matcher.")


# Sizes and replica options: MatcherConfig, applied with .options() by app.build.
@serve.deployment(name="Matcher")
@serve.ingress(app)
class Matcher:
    """ScaNN matcher replica and HTTP ingress. ``generator``: handle of the Generator
    tier (None: a generator elsewhere drains the store's queue). The admin token is
    resolved here at each admin request (``cfg.token()``: file, environment), never baked
    into the init arguments by the driver."""

    async def __init__(self, cfg: MatcherConfig, paths: ServePaths, generator=None):
        with open_store(paths.store_url) as store:
            stored = store.get_meta(INDEX_META_KEY)
        current = json.loads(stored)["index_dir"] if stored else paths.index_dir
        try:
            self.core = await asyncio.to_thread(
                MatcherCore, dataclasses.replace(paths, index_dir=current),
                cfg.history_events, cfg.fresh_share)
        except Exception:
            if current == paths.index_dir:
                raise
            log.exception("matcher: stored index %s unusable, starting on %s", current,
                          paths.index_dir)
            self.core = await asyncio.to_thread(MatcherCore, paths, cfg.history_events,
                                                cfg.fresh_share)
        # Background loops get their own store connection: the request path never waits
        # behind their writes.
        self.bg_store = open_store(paths.store_url)
        self.sids_dir = paths.sids_dir
        self.core.refresh_ad_status(self.bg_store)
        self.cfg = cfg
        self.Request = api.request_model(cfg.k_default, cfg.k_max, cfg.max_recent_events)
        self.generator = generator
        self.latency = tier_latency("matcher", MATCHER_BUCKETS_MS)
        self.responses = counter("leadre_http_responses_total",
                                 "HTTP answers of /recommend by status", "status")
        self.cache = counter("leadre_cache_lookups_total",
                             "candidate-store lookups by result (hit/miss/stale)", "result")
        self.sources = counter("leadre_recommended_ads_total", "ads returned, by source",
                               "source")
        self.queue = gauge("leadre_generation_queue_depth", "users waiting for LLM generation")
        self.wake_errors = counter("leadre_generation_wake_errors_total",
                                   "fire-and-forget generator wake-ups that failed")
        self.store_timeouts = counter("leadre_store_deadline_exceeded_total",
                                      "requests answered without the store: its reads took "
                                      "longer than store_deadline_ms")
        # Store reads and title encoding run here, never on the event loop.
        self._store_pool = ThreadPoolExecutor(cfg.store_threads, thread_name_prefix="store")
        self._encode_pool = ThreadPoolExecutor(1, thread_name_prefix="encode")
        # user -> newer request events to add to their stored context before requeueing
        self._pending: dict[str, list[dict]] = {}
        self._priority: set[str] = set()
        self._have_pending = asyncio.Event()
        self._wake_task: asyncio.Task | None = None
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._watch_ad_status()),
                       loop.create_task(self._watch_index()),
                       loop.create_task(self._enqueue_misses())]

    # --- background ----------------------------------------------------------------

    async def _watch_ad_status(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.ad_status_interval_s)
            try:
                if await asyncio.to_thread(self.core.refresh_ad_status, self.bg_store):
                    log.info("matcher: %d ads switched off (status v%d)",
                             len(self.core.off), self.core.ad_status_version)
            except StoreUnavailable as e:  # keep the last status until it is back
                log.warning("matcher: ad status refresh skipped: %s", e)
            except Exception:
                log.exception("matcher: ad status refresh failed")

    async def _watch_index(self) -> None:
        """Follow index swaps made through other replicas; publish the queue depth."""
        while True:
            await asyncio.sleep(self.cfg.watch_interval_s)
            try:
                raw = await asyncio.to_thread(self.bg_store.get_meta, INDEX_META_KEY)
                target = json.loads(raw) if raw else None
                if target and target["version"] != self.core.index.version:
                    await asyncio.to_thread(self.core.swap_index, target["index_dir"],
                                            target["version"])
                model = await asyncio.to_thread(self.bg_store.get_meta, MODEL_META_KEY)
                self.core.model_version = json.loads(model)["version"] if model else None
                self.queue.set(await asyncio.to_thread(self.bg_store.queue_depth))
            except StoreUnavailable as e:
                log.warning("matcher: store watch skipped: %s", e)
            except Exception:  # a bad directory must not kill the replica
                log.exception("matcher: store watch failed")

    async def _enqueue_misses(self) -> None:
        """One queue write per interval for all misses since the last, then one wake-up
        call to the generator (the queue is durable: a lost wake-up only waits for the
        generator's own polling)."""
        while True:
            await self._have_pending.wait()
            await asyncio.sleep(self.cfg.enqueue_interval_s)
            self._have_pending.clear()
            pending, self._pending = self._pending, {}
            first, self._priority = self._priority, set()
            try:
                await asyncio.to_thread(self._queue, pending, first)
            except Exception as e:  # they are queued again on their next request
                log.warning("matcher: queueing %d users for generation failed: %r",
                            len(pending), e)
                continue
            self._wake_generator()

    def _queue(self, pending: dict[str, list[dict]], first: set[str]) -> None:
        """Newer request events join the users' stored contexts (the generator prompts from
        those), then the users are queued, replaced-model ones ahead of the rest."""
        fresh = {u: evs for u, evs in pending.items() if evs}
        if fresh:
            now = time.time()
            contexts = self.bg_store.get_users(list(fresh))
            for u, ctx in contexts.items():
                new = [{**e, "ts": now if e.get("ts") is None else e["ts"]} for e in fresh[u]]
                ctx["events"] = merge_events(new, ctx.get("events"), self.cfg.context_events)
            self.bg_store.put_users(contexts)
        self.bg_store.enqueue([u for u in pending if u not in first])
        if first:
            self.bg_store.enqueue(sorted(first), priority=True)

    def _wake_generator(self) -> None:
        if self.generator is None or (self._wake_task and not self._wake_task.done()):
            return

        async def wake():
            try:
                await self.generator.wake.remote()
            except Exception as e:  # noqa: BLE001 - counted, never raised
                self.wake_errors.inc()
                log.debug("generator wake-up failed: %r", e)

        self._wake_task = asyncio.get_running_loop().create_task(wake())

    # --- HTTP ----------------------------------------------------------------------

    def _done(self, status: int, t0: float) -> None:
        self.latency.observe((time.perf_counter() - t0) * 1000)
        self.responses.inc(tags={"status": str(status)})

    @app.post("/recommend")
    async def http_recommend(self, request: Request):
        t0 = time.perf_counter()
        data, err = await api.read_json(request, self.cfg.max_body_bytes,
                                        self.cfg.max_drain_bytes)
        if err is not None:
            self._done(err.status_code, t0)
            return err
        try:
            req = self.Request.model_validate(data)
        except ValidationError as e:
            self._done(422, t0)
            return api.error(422, "invalid request", api.field_errors(e))
        out = await self._recommend(req.user_id, req.k,
                                    [e.model_dump() for e in req.recent_events])
        resp = api.json_response(out)
        self._done(200, t0)
        return resp

    async def _recommend(self, user_id: str, k: int, events: list[dict]) -> dict:
        loop = asyncio.get_running_loop()
        read = loop.run_in_executor(self._store_pool, self.core.lookup, user_id)
        try:
            found = await asyncio.wait_for(read, self.cfg.store_deadline_ms / 1000)
        except asyncio.TimeoutError:  # the read goes on in its thread; we answer now
            found = UNAVAILABLE
            self.store_timeouts.inc()
        stored = (found.context or {}).get("events") or []
        if self.core.needs_encoding(events) or self.core.needs_encoding(stored):
            out = await loop.run_in_executor(self._encode_pool, self.core.answer, user_id, k,
                                             events, found)
        else:
            out = self.core.answer(user_id, k, events, found)
        if out["queued"]:
            fresh = newer_events(events, found.record.basis) if out["fresh_events"] else []
            self._pending.setdefault(user_id, []).extend(fresh)
            if out["priority"]:
                self._priority.add(user_id)
            self._have_pending.set()
        self.cache.inc(tags={"result": out["cache"]})
        counts: dict[str, int] = {}
        for a in out["ads"]:
            counts[a["source"]] = counts.get(a["source"], 0) + 1
        for source, n in counts.items():
            self.sources.inc(n, tags={"source": source})
        return out

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok", **self.core.index_info()}

    @app.post("/admin/index")
    async def http_swap_index(self, request: Request):
        req, err = await self._admin_body(request, api.IndexSwap)
        if err is not None:
            return err
        # Validate and swap here first (and persist it for replicas that start later);
        # only then fan out, so a bad directory touches nothing.
        try:
            first = await self.swap_index(req.index_dir)
        except Exception as e:  # noqa: BLE001 - the replica keeps its old index
            return api.error(400, f"index swap rejected: {api.cause(e)}")
        results = await self._everyone().broadcast(
            "swap_index", req.index_dir, persist=False).results_async(timeout_s=120)
        return {"status": "swapped", **first, "replicas": len(results)}

    @app.post("/admin/ads")
    async def http_ad_status(self, request: Request):
        """Switch ads off (or back on) on every replica, without an index rebuild: the
        store records it (replicas starting later read it there) and every replica is
        told at once; a replica the call misses catches up within
        ``ad_status_interval_s``."""
        req, err = await self._admin_body(request, api.AdStatusChange)
        if err is not None:
            return err
        version = await asyncio.to_thread(self.bg_store.set_ads_active, req.ad_ids,
                                          req.active)
        results = await self._everyone().broadcast("apply_ad_status").results_async(
            timeout_s=30, return_exceptions=True)
        told = sum(1 for r in results if not isinstance(r, BaseException))
        return {"status": "updated", "ad_status_version": version,
                "ads": len(set(req.ad_ids)), "active": req.active, "replicas": told,
                "ads_switched_off": len(self.core.off)}

    @app.post("/admin/ads/new")
    async def http_add_ads(self, request: Request):
        """Add ads new to the catalog without retraining (``leadre add-ads``): their S-IDs
        and a new index version are written here, then every replica swaps to the index and
        every generator reloads the S-ID table. 400 names each unusable ad; nothing is added
        then."""
        req, err = await self._admin_body(request, api.AdsAdd)
        if err is not None:
            return err
        from leadre.serve.admin import admin_add_ads

        return await admin_add_ads(self.add_ads(req.ads), self._everyone())

    @app.post("/admin/model")
    async def http_rollout(self, request: Request):
        """Roll out a new model: checked here, recorded in the store; every Generator replica
        loads it within its poll interval and regenerates the users still holding the old
        model's candidates first (they are served meanwhile)."""
        req, err = await self._admin_body(request, api.ModelRollout)
        if err is not None:
            return err
        try:
            return await self.start_rollout(req.model_dir)
        except Exception as e:  # noqa: BLE001 - nothing changed
            return api.error(400, f"model rollout rejected: {api.cause(e)}")

    async def _admin_body(self, request: Request, model):
        """The admin request, or the 4xx to send: 404 when the admin routes are on their own
        port (``cfg.admin_port``: the ``Admin`` deployment serves them there), else the
        token (resolved now, in this replica) and the body (:func:`admin.admin_body`)."""
        from leadre.serve.admin import admin_body

        if self.cfg.admin_port is not None:
            return None, api.error(404, "Not Found")
        return await admin_body(request, model, self.cfg)

    def _everyone(self):
        ctx = serve.get_replica_context()
        return serve.get_deployment_handle(ctx.deployment, ctx.app_name)

    # --- handle API (the tier also runs alone, without HTTP) --------------------------

    async def recommend(self, user_id: str, k: int,
                        recent_events: list[dict] | None = None) -> dict:
        t0 = time.perf_counter()
        out = await self._recommend(user_id, k, recent_events or [])
        self.latency.observe((time.perf_counter() - t0) * 1000)
        return out

    async def swap_index(self, index_dir: str, persist: bool = True) -> dict:
        """Swap this replica's index; ``persist`` records it in the store so replicas
        that start later (autoscaling, restarts) and the other replicas follow."""
        info = await asyncio.to_thread(self.core.swap_index, index_dir, "")
        if persist:
            meta = await asyncio.to_thread(self._meta)
            await asyncio.to_thread(self.bg_store.set_meta, INDEX_META_KEY, json.dumps(
                {"index_dir": index_dir, "version": info["index_version"],
                 "user_config": meta.get("user_config")}))
        return info

    async def add_ads(self, ads: list[dict]) -> dict:
        """Extend the catalog by ``ads`` next to the index in use (a new index version beside
        it), swap this replica to it and record both in the store (the index for the other
        matcher replicas, the catalog for the generators). Unusable ads: ``{"status":
        "refused", "error", "problems"}`` and nothing written."""
        from leadre.index.add_ads import add_ads
        from leadre.sids.extend import AdsRefused

        try:
            out = await asyncio.to_thread(add_ads, self.sids_dir, ads=ads,
                                          index_dir=self.core.index.location)
        except AdsRefused as e:
            return {"status": "refused", "error": str(e),
                    "problems": [{"ad": a, "reason": r} for a, r in e.problems]}
        await self.swap_index(out["index_dir"])
        await asyncio.to_thread(self.bg_store.set_meta, CATALOG_META_KEY, json.dumps(
            {k: out[k] for k in ("ads", "catalog", "sid_version", "index_dir",
                                 "index_version")}))
        return out

    async def start_rollout(self, model_dir: str) -> dict:
        out = await asyncio.to_thread(start_rollout, self.bg_store, model_dir, self.sids_dir)
        self.core.model_version = out["model_version"]  # the other replicas: at their watch
        return out

    async def apply_ad_status(self) -> int:
        await asyncio.to_thread(self.core.refresh_ad_status, self.bg_store)
        return self.core.ad_status_version

    async def info(self) -> dict:
        return self.core.index_info()

    def _meta(self) -> dict:
        raw = self.bg_store.get_meta(INDEX_META_KEY)
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
        self.bg_store.set_meta(INDEX_META_KEY, json.dumps(
            {"index_dir": index_dir, "version": info["index_version"],
             "user_config": index_dir}))

    async def check_health(self) -> None:
        if self.core.index is None or len(self.core.index) == 0:
            raise RuntimeError("matcher has no index")

