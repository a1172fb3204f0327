"""Bulk warm-up of the candidate store with Ray Data (``leadre warm``, ``ray_jobs/warm_cache.py``).

Two passes over the ingest tables:

1. contexts: the users table in batches; each batch reads its users' events with a
   pushed-down filter (no shuffle) -> profile + long-term categories + the last
   ``max_events`` behaviours -> ``store.put_users``;
2. generation: the ids of the active users stream through an actor pool of generators
   (``generation.num_replicas`` model copies, ``num_gpus`` each on a GPU cluster) that write candidates with
   the TTL and versions, exactly as the serving Generator does.

"Active users" = users with at least one event in the last ``active_days`` days of the log
(all users with events when unset).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace

import numpy as np
import pandas as pd

from leadre.serve.config import GeneratorConfig, ServePaths, WarmConfig

log = logging.getLogger(__name__)


def _contexts_fn(batch: pd.DataFrame, events_path: str, ads_category, store_url: str,
                 max_events: int) -> pd.DataFrame:
    """Contexts of one batch of users: their events are read with a pushed-down filter."""
    import pyarrow.dataset as pads
    import ray

    from leadre.artifacts import resolve
    from leadre.index.context import contexts_from_frames
    from leadre.serve.store import open_store

    cats = ray.get(ads_category) if isinstance(ads_category, ray.ObjectRef) else ads_category
    fs, path = resolve(events_path)
    uids = batch.user_id.astype(str).tolist()
    events = pads.dataset(path, filesystem=fs, format="parquet").to_table(
        filter=pads.field("user_id").isin(uids)).to_pandas()
    ctx = contexts_from_frames(batch, events, cats, max_events)
    with open_store(store_url) as store:
        store.put_users(ctx)
    return pd.DataFrame({"users": [len(ctx)]})


class _GenerateWorker:
    def __init__(self, cfg: GeneratorConfig, paths: ServePaths):
        from leadre.serve.generator import GeneratorCore

        self.core = GeneratorCore(cfg, paths)

    def __call__(self, batch: dict) -> dict:
        out = self.core.generate_and_store([str(u) for u in batch["user_id"]])
        return {"written": np.asarray([out.written])}


def run(cfg: WarmConfig) -> dict:
    import ray
    import ray.data

    from leadre.artifacts import join, read_manifest, read_table
    from leadre.runtime import init_ray

    # Same absolute-path rules as serving (workers may run elsewhere).
    paths = ServePaths(sids_dir=cfg.sids_dir, store_url=cfg.store_url, index_dir=cfg.index_dir,
                       model_dir=cfg.model_dir).absolute()
    # Up front: a wrong directory would fail only inside the Ray Data workers.
    read_manifest(cfg.ingest_dir, stage="ingest")
    # The LLM generator does not read the index.
    (replace(paths, index_dir=None) if cfg.model_dir else paths).check()
    gen_cfg = GeneratorConfig(ttl_s=cfg.ttl_s, generation=cfg.generation)
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    timings = {}
    ads = read_table(cfg.ingest_dir, "ads").select(["ad_id", "category"]).to_pandas()
    # Batches of users, each reading only its users' events (predicate pushdown): no shuffle.
    written_ctx = ray.data.read_parquet(join(cfg.ingest_dir, "users")).map_batches(
        _contexts_fn, batch_format="pandas", batch_size=cfg.context_batch_size,
        fn_kwargs={"events_path": join(cfg.ingest_dir, "events"), "ads_category": ray.put(ads),
                   "store_url": paths.store_url, "max_events": cfg.max_events},
    ).sum("users") or 0
    timings["contexts_s"] = round(time.perf_counter() - t0, 2)

    ev = read_table(cfg.ingest_dir, "events").select(["user_id", "ts"]).to_pandas()
    if cfg.active_days is not None and len(ev):
        cutoff = ev.ts.max() - pd.Timedelta(days=cfg.active_days)
        ev = ev[ev.ts >= cutoff]
    active = sorted(ev.user_id.unique().tolist())
    generated = 0
    if not cfg.contexts_only and active:
        t1 = time.perf_counter()
        ds = ray.data.from_items([{"user_id": u} for u in active])
        generated = ds.map_batches(
            _GenerateWorker, fn_constructor_kwargs={"cfg": gen_cfg, "paths": paths},
            batch_size=cfg.generation.batch_size, concurrency=cfg.generation.num_replicas,
            **cfg.generation.ray_resources()).sum("written") or 0
        timings["generate_s"] = round(time.perf_counter() - t1, 2)
        timings["users_per_s"] = round(generated / max(timings["generate_s"], 1e-9), 1)
    summary = {"store_url": paths.store_url, "contexts": int(written_ctx),
               "active_users": len(active), "generated": int(generated),
               "engine": "llm" if cfg.model_dir else "embedding-baseline", **timings}
    return {"stage": "warm", "config": asdict(cfg), "summary": summary}
