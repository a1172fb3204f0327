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
import logging
import os
import time
from dataclasses import dataclass

from ray import serve

from leadre.serve.config import GeneratorConfig, ServePaths
from leadre.serve.metrics import GENERATOR_BUCKETS_MS, counter, gauge, histogram, tier_latency
from leadre.serve.store import CandidateRecord, StoreUnavailable, open_store

log = logging.getLogger(__name__)


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
        self.ttl_s = cfg.ttl_s
        self.top_k = cfg.generation.top_k
        self.table = load_table(paths.sids_dir)
        self.engine = "llm" if paths.model_dir else "embedding"
        if paths.model_dir:
            from leadre.model.decode import SidGenerator
            from leadre.prompts import trained_prompt_config

            self.llm = SidGenerator.from_stage_dir(
                paths.model_dir, paths.sids_dir, cfg.generation)
            self.table = self.llm.table
            self.model_version = _model_version(paths.model_dir)
            self.prompt_cfg = trained_prompt_config(paths.model_dir)
        else:
            from leadre.index.ann import AdIndex
            from leadre.index.query import QueryBuilder

            if paths.index_dir is None:
                raise ValueError("the embedding generator needs paths.index_dir")
            self.index = AdIndex.load(paths.index_dir, root=paths.index_root)
            self.queries = QueryBuilder.from_sids_dir(paths.sids_dir)
            self.model_version = "embedding-baseline"

    def device(self) -> str:
        return str(self.llm.device) if self.engine == "llm" else "cpu"

    def candidates(self, contexts: list[dict | None]) -> list[list[tuple[str, float]]]:
        """(S-ID, score) lists, best first, one per context."""
        if self.engine == "llm":
            from leadre.index.context import build_prompt

            prompts = [build_prompt(c, self.table, cfg=self.prompt_cfg) for c in contexts]
            return [[(c.sid, c.score) for c in cands]
                    for cands in self.llm.generate(prompts, self.top_k)]
        out = []
        for ctx in contexts:
            q = self.queries.vector((ctx or {}).get("events") or [])
            if q is None:
                ads = [(self.index.ad_ids[r], 0.0) for r in self.index.popular[:self.top_k]]
            else:
                ads = self.index.search(q, self.top_k)
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
                                self.model_version, self.table.version, now)
                for u, c in zip(users, cands)]
        written = self.store.put_many(recs, ttl_s=self.ttl_s)
        self.store.ack(users)
        return GeneratedBatch(len(users), written, time.perf_counter() - t0)


def _model_version(model_dir: str) -> str:
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
        if cfg.niceness:
            os.nice(cfg.niceness)  # threads started from here on (torch's) inherit it
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
        self._drain = asyncio.get_running_loop().create_task(self._drain_queue())
        log.info("generator: engine=%s model=%s device=%s", self.core.engine,
                 self.core.model_version, self.core.device())

    async def _drain_queue(self) -> None:
        store_down = False  # said once per outage, not at every poll
        while True:
            try:
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
                "device": self.core.device(), "sid_version": self.core.table.version}
