"""The latency-tolerant tier: the fine-tuned LLM generates S-IDs into the candidate store.

Work arrives through the store's durable queue: the matcher queues cache misses and wakes a
replica with ``Generator.wake()`` (fire-and-forget, one call for many users); each replica
drains the queue (``claim`` with a lease, ``ack`` when the candidates are written) into the
same ``@serve.batch`` method that ``Generator.generate(user_id)`` calls, polling when nobody
wakes it, so users queued while no generator was alive, or claimed by a replica that died
mid-batch, are generated anyway.

The replica lowers its own CPU priority (``GeneratorConfig.niceness``): where it shares cores
with the matcher, the LLM is the one that waits.

Engines: ``llm`` = ``leadre.model.decode.SidGenerator`` (trie-constrained beam search over active
ads; GPU when present) on the user's intent-aware prompt; ``embedding`` = a baseline used when
no trained model is configured (nearest active ads to the user's history), so the graph runs
end to end before training finishes. Results carry ``model_version`` so the two never mix
silently.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

from ray import serve

from leadre.serve.config import GeneratorConfig, ServePaths
from leadre.serve.metrics import GENERATOR_BUCKETS_MS, counter, gauge, histogram, tier_latency
from leadre.serve.store import CandidateRecord, StoreUnavailable, open_store

log = logging.getLogger(__name__)

# Store meta key of the model rolled out: {"model_dir": ..., "version": ...}, written by the
# admin call; every generator replica follows it, the matcher reads its version.
MODEL_META_KEY = "model"
# Store meta key of the catalog grown by `POST /admin/ads/new`: {"ads": n, "index_dir": ...,
# "sid_version": ..., "catalog": ...}; every generator replica reloads the S-ID table (and
# its trie, or the embedding engine's index) when ``ads`` differs from its own table.
CATALOG_META_KEY = "catalog"


@dataclass
class GeneratedBatch:
    users: int
    written: int
    seconds: float


class GeneratorCore:
    """Context -> prompt -> candidates -> store, for a batch of user ids (in-process). Of
    ``cfg`` it uses ``ttl_s`` and ``generation``; ``paths.model_dir``
    unset selects the embedding engine, which searches ``paths.index_dir``."""

    def __init__(self, cfg: GeneratorConfig, paths: ServePaths):
        from leadre.sids import load_table

        self.store = open_store(paths.store_url)
        self.cfg, self.paths = cfg, paths
        self.ttl_s = cfg.ttl_s
        self.off: frozenset[str] = frozenset()  # ads switched off, applied to the trie
        self.ad_status_version = 0
        self.top_k = cfg.generation.top_k
        self.table = load_table(paths.sids_dir)
        self.content = None  # knowledge tokens of content titles (LLM engine)
        self.engine = "llm" if paths.model_dir else "embedding"
        # the catalog's current index version (ads added since deployment live in a newer one)
        catalog = self.store.get_meta(CATALOG_META_KEY)
        self.index_dir = json.loads(catalog)["index_dir"] if catalog else paths.index_dir
        if paths.model_dir:
            from leadre.model.decode import SidGenerator
            from leadre.prompts import trained_prompt_config

            self.llm = SidGenerator.from_stage_dir(
                paths.model_dir, paths.sids_dir, cfg.generation)
            self._dense_index(self.llm)
            self._check_reach(self.llm)
            self.table = self.llm.table
            self.model_version = model_version(paths.model_dir)
            self.prompt_cfg = trained_prompt_config(paths.model_dir)
            self.content = self._content_codes()
        else:
            from leadre.index.ann import AdIndex
            from leadre.index.query import QueryBuilder

            if paths.index_dir is None:
                raise ValueError("the embedding generator needs paths.index_dir")
            self.index = AdIndex.load(self.index_dir, root=paths.index_root)
            self.queries = QueryBuilder.from_sids_dir(paths.sids_dir)
            self.model_version = "embedding-baseline"

    def device(self) -> str:
        return str(self.llm.device) if self.engine == "llm" else "cpu"

    def swap_model(self, model_dir: str) -> str:
        """Load ``model_dir`` (an sft/dpo output for the same S-IDs) and generate with it from
        now on; returns its version. The new decoder's trie gets the live ad status."""
        from leadre.artifacts import check_model
        from leadre.model.decode import SidGenerator
        from leadre.prompts import trained_prompt_config

        check_model(model_dir, self.table.version, self.paths.sids_dir)
        llm = SidGenerator.from_stage_dir(model_dir, self.paths.sids_dir, self.cfg.generation)
        self._dense_index(llm)
        self._check_reach(llm)
        if self.off:
            llm.set_active(sorted(self.off), False)
        self.llm, self.table, self.engine = llm, llm.table, "llm"
        self.prompt_cfg = trained_prompt_config(model_dir)
        self.content = self._content_codes()
        self.model_version = model_version(model_dir)
        log.info("generator: now generating with %s (%s)", model_dir, self.model_version)
        return self.model_version

    def _check_reach(self, llm) -> None:
        """A model without a dense head lists at most ``beam_size`` ads: refuse a ``top_k``
        only a fused list could fill, at load rather than on every batch."""
        if not llm.fused and self.top_k > llm.cfg.beam_size:
            from leadre.config import ConfigError

            raise ConfigError(f"generator: top_k={self.top_k} > beam_size="
                              f"{llm.cfg.beam_size} and the model has no dense head (or "
                              "ranking=beam): raise generation.beam_size")

    def _dense_index(self, llm) -> None:
        """With a dense head, the ScaNN index of the serving graph (its current version:
        ``index_dir``) answers its query (the ads' vectors of the same encoder, checked), so
        fusing adds no hop to the hot path."""
        index_dir = self.index_dir
        if llm.head is None or not index_dir:
            return
        from leadre.index.ann import AdIndex
        from leadre.model.dense import check_encoder

        index = AdIndex.load(index_dir, root=self.paths.index_root)
        check_encoder(llm.dense_meta, index.info.get("encoder_version"), self.paths.model_dir
                      or "the model", index_dir)
        llm.use_index(index)

    def _content_codes(self):
        """The knowledge tokens of content titles, with the S-ID stage's encoder and quantiser
        loaded to code titles never seen offline; None when the model shows titles."""
        from leadre.sids.content import ContentCodes

        pc = self.prompt_cfg
        if pc.content_object == "title":
            return None
        codes = ContentCodes.from_sids_dir(self.paths.sids_dir, pc.content_code_levels,
                                           self.table.prefixes)
        return codes.attach(self.paths.sids_dir) if codes is not None else None

    def content_of(self, contexts: list[dict | None]):
        """title -> prompt object for these contexts, coding unseen titles first (this tier
        is latency-tolerant: an encoder call per batch of new titles)."""
        if self.content is None:
            return None
        from leadre.prompts.render import content_text

        self.content.add_unseen([e.get("title") for c in contexts for e in (c or {}).get(
            "events", []) if not e.get("ad_id")])
        mode, code = self.prompt_cfg.content_object, self.content.code
        return lambda title: content_text(title, code(title), mode)

    def follow_ad_status(self) -> bool:
        """Apply the store's live ad status to the decoder's trie when its version moved:
        switched-off ads take no beam slots. True when it changed."""
        if self.store.ads_status_version() == self.ad_status_version:
            return False
        version, off = self.store.inactive_ads()
        off = frozenset(off)
        if self.engine == "llm":
            back_on = sorted(self.off - off)
            if back_on:
                self.llm.set_active(back_on, True)
            if off - self.off:
                self.llm.set_active(sorted(off - self.off), False)
        self.off, self.ad_status_version = off, version
        return True

    def follow_catalog(self) -> bool:
        """Ads added to the catalog since this table was loaded (the store's
        :data:`CATALOG_META_KEY`): reload the S-ID table (same version, a pure append) into
        the decoder's trie, or the new index into the embedding engine. True when it did."""
        raw = self.store.get_meta(CATALOG_META_KEY)
        target = json.loads(raw) if raw else None
        if not target or target["ads"] == len(self.table):
            return False
        from leadre.sids import load_table
        from leadre.sids.ann import load_embeddings

        table = load_table(self.paths.sids_dir)
        if table.version != self.table.version:
            log.error("generator: %s holds S-ID version %s, not %s: catalog not followed",
                      self.paths.sids_dir, table.version, self.table.version)
            return False
        self.index_dir = target["index_dir"]
        if self.engine == "llm":
            from leadre.model.decode import table_vectors

            # a dense head scores the new ads by their vectors, found in the new index
            self.llm.refresh_active(table, table_vectors(table, self.paths.sids_dir)
                                    if self.llm.head is not None else None)
            self._dense_index(self.llm)
            if self.off:
                self.llm.set_active(sorted(self.off), False)
        else:
            from leadre.index.ann import AdIndex

            self.index = AdIndex.load(self.index_dir, root=self.paths.index_root)
            self.queries = self.queries.with_embeddings(*load_embeddings(self.paths.sids_dir))
        self.table = table
        log.info("generator: catalog now %d ads", len(table))
        return True

    def candidates(self, contexts: list[dict | None]) -> list[list[tuple[str, float]]]:
        """(S-ID, score) lists, best first, one per context."""
        if self.engine == "llm":
            from leadre.index.context import build_prompt

            content_of = self.content_of(contexts)
            prompts = [build_prompt(c, self.table, cfg=self.prompt_cfg, content_of=content_of)
                       for c in contexts]
            return [[(c.sid, c.score) for c in cands]
                    for cands in self.llm.generate(prompts, self.top_k)]
        out = []
        for ctx in contexts:
            q = self.queries.vector((ctx or {}).get("events") or [])
            if q is None:
                ads = [(self.index.ad_ids[r], 0.0) for r in self.index.popular[:self.top_k]]
            else:
                ads = self.index.search(q, self.top_k + len(self.off))
            ads = [a for a in ads if a[0] not in self.off][:self.top_k]
            sids = self.table.sids([a for a, _ in ads])
            out.append([(s, sc) for s, (_, sc) in zip(sids, ads) if s is not None])
        return out

    def generate_and_store(self, user_ids: list[str]) -> GeneratedBatch:
        t0 = time.perf_counter()
        users = list(dict.fromkeys(user_ids))
        ctx = self.store.get_users(users)
        cands = self.candidates([ctx.get(u) for u in users])
        now = time.time()
        recs = [CandidateRecord(u, [s for s, _ in c], [float(x) for _, x in c],
                                self.model_version, self.table.version, now,
                                basis_ts=_newest_event(ctx.get(u)))
                for u, c in zip(users, cands)]
        written = self.store.put_many(recs, ttl_s=self.ttl_s)
        self.store.ack(users)
        return GeneratedBatch(len(users), written, time.perf_counter() - t0)


def _newest_event(context: dict | None) -> float | None:
    """The time of the newest event a prompt was built from: the candidates' basis."""
    times = [e["ts"] for e in (context or {}).get("events") or [] if e.get("ts") is not None]
    return max(times) if times else None


def start_rollout(store, model_dir: str, sids_dir: str) -> dict:
    """The admin call behind a model rollout: check ``model_dir`` (an sft/dpo output for the
    S-IDs being served; raises :class:`~leadre.artifacts.ArtifactError` or
    ``FileNotFoundError`` otherwise) and record it in the store, where every Generator replica
    picks it up within its poll interval and every Matcher replica learns its version."""
    from leadre.artifacts import check_model
    from leadre.sids import load_table

    check_model(model_dir, load_table(sids_dir).version, sids_dir)
    version = model_version(model_dir)
    store.set_meta(MODEL_META_KEY, json.dumps({"model_dir": model_dir, "version": version}))
    return {"status": "rolling out", "model_dir": model_dir, "model_version": version}


def model_version(model_dir: str) -> str:
    """The training manifest's identity (stage + creation time), hashed short."""
    from leadre.artifacts import read_manifest

    try:
        m = read_manifest(model_dir)
        raw = f"{m.get('stage')}:{m.get('created_at')}:{m.get('version', '')}"
        return f"{m.get('stage')}-{hashlib.sha256(raw.encode()).hexdigest()[:10]}"
    except Exception:
        return "model-" + hashlib.sha256(model_dir.encode()).hexdigest()[:10]


# Sizes and replica options: GeneratorConfig, applied with .options() by app.build.
@serve.deployment(name="Generator")
class Generator:
    """LLM generator replica: ``@serve.batch`` over user ids + a queue-draining loop."""

    async def __init__(self, cfg: GeneratorConfig, paths: ServePaths):
        # Threads started from here on (torch's, the decoding thread) inherit both.
        if cfg.niceness:
            os.nice(cfg.niceness)
        if cfg.idle_priority and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        self.core = await asyncio.to_thread(GeneratorCore, cfg, paths)
        # Before any call can arrive: the batch sizes are the config's, not the decorator's.
        self.generate.set_max_batch_size(cfg.generation.batch_size)
        self.generate.set_batch_wait_timeout_s(cfg.batch_wait_s)
        self.batch_size = cfg.generation.batch_size
        self.poll, self.lease = cfg.poll_interval_s, cfg.lease_s
        self.latency = tier_latency("generator", GENERATOR_BUCKETS_MS)
        self.users = counter("leadre_generated_users_total",
                             "users whose candidates were (re)generated")
        self.queue = gauge("leadre_generation_queue_depth", "users waiting for LLM generation")
        self.batch_sizes = histogram("leadre_generator_batch_size",
                                     "users per generation batch", [1, 2, 4, 8, 16, 32, 64])
        self._woken = asyncio.Event()
        self._last_follow = 0.0
        self._drain = asyncio.get_running_loop().create_task(self._drain_queue())
        log.info("generator: engine=%s model=%s device=%s", self.core.engine,
                 self.core.model_version, self.core.device())

    async def _follow_store(self) -> None:
        """At most once per poll interval: the rolled-out model (swapped in, then the users
        still holding the old model's candidates are queued ahead of the rest) and the live
        ad status (applied to the trie)."""
        if time.monotonic() - self._last_follow < self.poll:
            return
        self._last_follow = time.monotonic()
        raw = await asyncio.to_thread(self.core.store.get_meta, MODEL_META_KEY)
        target = json.loads(raw) if raw else None
        if target and target["version"] != self.core.model_version:
            try:
                version = await asyncio.to_thread(self.core.swap_model, target["model_dir"])
            except Exception:  # a bad rollout keeps the current model generating
                log.exception("generator: cannot roll out %s", target["model_dir"])
            else:
                stale = await asyncio.to_thread(self.core.store.users_not_of_model, version)
                await asyncio.to_thread(self.core.store.enqueue, stale, True)
                log.info("generator: %d users queued first for the new model", len(stale))
        await asyncio.to_thread(self.core.follow_catalog)
        await asyncio.to_thread(self.core.follow_ad_status)

    async def _drain_queue(self) -> None:
        store_down = False  # said once per outage, not at every poll
        while True:
            try:
                await self._follow_store()
                ids = await asyncio.to_thread(self.core.store.claim, self.batch_size,
                                              self.lease)
                if store_down:
                    log.info("generator: store reachable again, draining the queue")
                    store_down = False
                self.queue.set(await asyncio.to_thread(self.core.store.queue_depth))
                if ids:
                    await asyncio.gather(*(self.generate(u) for u in ids))
                    continue
            except StoreUnavailable as e:  # claims come back after their lease
                if not store_down:
                    log.warning("generator: store unavailable, queue drain waits: %s", e)
                store_down = True
            except RuntimeError as e:  # the replica is shutting down
                if "shutdown" in str(e):
                    return
                log.exception("generator: queue drain failed")
            except Exception:
                log.exception("generator: queue drain failed")
            try:  # until the matcher wakes us, or the next poll
                await asyncio.wait_for(self._woken.wait(), self.poll)
            except asyncio.TimeoutError:
                pass
            self._woken.clear()

    async def wake(self) -> None:
        """Fire-and-forget from the matcher: users are waiting in the store's queue."""
        self._woken.set()

    @serve.batch
    async def generate(self, user_ids: list[str]) -> list[bool]:
        t0 = time.perf_counter()
        # The model runs in a worker thread: the replica keeps accepting requests.
        out = await asyncio.to_thread(self.core.generate_and_store, user_ids)
        self.latency.observe((time.perf_counter() - t0) * 1000)
        self.users.inc(out.users)
        self.batch_sizes.observe(len(user_ids))
        return [True] * len(user_ids)

    async def info(self) -> dict:
        return {"engine": self.core.engine, "model_version": self.core.model_version,
                "device": self.core.device(), "sid_version": self.core.table.version,
                "catalog_ads": len(self.core.table)}
