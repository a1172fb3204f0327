"""Stage 7, ``leadre index``: a ScaNN index over the embeddings of the *active* ads, for the
serving matcher (the ScaNN wrapper is :mod:`leadre.sids.ann`, the loaded index
:class:`~leadre.index.ann.AdIndex`).

The matcher fills a user's generated candidates up to k with nearest active ads and answers
cache misses with a real-time nearest-neighbour query; both need an index that holds only ads
that may be shown. ScaNN cannot add or delete points in place (we never rely on it), so an
ad switching on or off means: rebuild this stage (seconds) and swap the directory into the
running matcher (``POST /admin/index`` or ``serve deploy`` with a new ``user_config``).

After the build, the query-time knobs (leaves searched, neighbours re-scored) are tuned on one
query set to the cheapest setting whose recall@10 against exact NumPy search reaches
``min_recall``, and recall is then *reported on another* (held-out) set: both sets are built
the way serving builds its real-time queries, from users' histories
(:class:`~leadre.index.query.QueryBuilder` over ``user_contexts``), when ``ingest_dir`` has
events; otherwise from ads' own embeddings plus noise (``query_source`` in the manifest says
which).

Layout of an index directory::

    <dir>/scann/            ScaNN's serialize(..., relative_path=True) output (relocatable)
    <dir>/ads/              parquet: row (ScaNN datapoint id) -> ad_id, eCPM, popularity
    <dir>/index.json        mode, query params, versions, dim, recall
    <dir>/manifest.json     stage "index", and the content hash every loader verifies

No pickle is ever written (ScaNN would pickle string doc ids; ours are row numbers).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from leadre.artifacts import (ArtifactError, exists, join, read_manifest, read_table, resolve,
                              timed, write_json, write_manifest, write_table)
from leadre.data.schema import ENGAGE
from leadre.index.ann import ADS_TABLE, INDEX_JSON, SCANN_DIR, STAGE
from leadre.index.config import IndexConfig
from leadre.sids.ann import build, eval_queries, load_embeddings, normalize
from leadre.index.verify import content_digest, refuse_pickles

log = logging.getLogger(__name__)



def _active_and_meta(cfg: IndexConfig, ad_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                      np.ndarray, str]:
    """(active mask, eCPM, popularity) per embedding row and the S-ID table version."""
    from leadre.sids import load_table

    table = load_table(cfg.sids_dir)
    rows = table.rows_of(ad_ids)
    active = np.where(rows >= 0, table.active[rows.clip(min=0)], False)
    ecpm = np.zeros(len(ad_ids), np.float32)
    popularity = np.zeros(len(ad_ids), np.float64)
    if cfg.ingest_dir:
        ads = read_table(cfg.ingest_dir, "ads")
        idx = {a: i for i, a in enumerate(ad_ids.tolist())}
        pos = np.array([idx.get(a, -1) for a in ads.column("ad_id").to_pylist()])
        ok = pos >= 0
        act = ads.column("active").to_numpy(zero_copy_only=False)
        # The catalog is the truth: unknown ads are off, except those `leadre add-ads` added
        # after the ingest (the S-ID table holds their flags, `added_ads` their eCPM).
        added = _added_ads(cfg.sids_dir, idx)
        active = np.zeros(len(ad_ids), bool)
        active[added] = np.where(rows[added] >= 0, table.active[rows[added].clip(min=0)], False)
        active[pos[ok]] = act[ok]
        if "ecpm" in ads.column_names:
            e = ads.column("ecpm").fill_null(0.0).to_numpy(zero_copy_only=False)
            ecpm[pos[ok]] = e[ok]
        ecpm[added] = _added_ecpm(cfg.sids_dir, ad_ids[added])
        if exists(join(cfg.ingest_dir, "events")):
            ev = read_table(cfg.ingest_dir, "events").select(["action", "ad_id"])
            ev = ev.filter(pc.is_in(ev.column("action"), pa.array(ENGAGE)))
            counts = ev.group_by("ad_id").aggregate([("ad_id", "count")])
            for a, c in zip(counts.column("ad_id").to_pylist(),
                            counts.column("ad_id_count").to_pylist()):
                if a in idx:
                    popularity[idx[a]] = c
    return active, ecpm, popularity, table.version


def _added_ads(sids_dir: str, idx: dict[str, int]) -> np.ndarray:
    """Embedding rows of the ads ``leadre add-ads`` added to ``sids_dir``."""
    from leadre.sids.extend import ADDED

    if not exists(join(sids_dir, ADDED)):
        return np.zeros(0, np.int64)
    ids = read_table(sids_dir, ADDED, columns=["ad_id"]).column("ad_id").to_pylist()
    return np.asarray([idx[a] for a in ids if a in idx], np.int64)


def _added_ecpm(sids_dir: str, ad_ids: np.ndarray) -> np.ndarray:
    from leadre.sids.extend import ADDED

    if not len(ad_ids):
        return np.zeros(0, np.float32)
    t = read_table(sids_dir, ADDED, columns=["ad_id", "ecpm"])
    of = dict(zip(t.column("ad_id").to_pylist(), t.column("ecpm").to_pylist()))
    return np.asarray([of.get(a) or 0.0 for a in ad_ids.tolist()], np.float32)


def history_queries(cfg: IndexConfig, n: int) -> np.ndarray | None:
    """Up to ``n`` real-time queries built exactly as the matcher builds them (each user's
    last ``history_events`` events -> :class:`QueryBuilder`), users in a seeded random
    order; None without an ingest directory holding events."""
    if not cfg.ingest_dir or not exists(join(cfg.ingest_dir, "events")):
        return None
    from leadre.index.query import QueryBuilder
    from leadre.index.context import merge_events, user_contexts

    contexts = user_contexts(cfg.ingest_dir, max_events=cfg.history_events)
    users = sorted(contexts)
    np.random.default_rng(cfg.seed).shuffle(users)
    qb = QueryBuilder.from_sids_dir(cfg.sids_dir)
    out = []
    for u in users:
        v = qb.vector(merge_events(None, contexts[u]["events"], cfg.history_events))
        if v is not None:
            out.append(v)
            if len(out) >= n:
                break
    return np.stack(out) if len(out) >= 20 else None


def run(cfg: IndexConfig) -> dict:
    """Build the index of the active ads of ``cfg.sids_dir`` into ``cfg.out``."""
    timings: dict[str, float] = {}
    sids_manifest = read_manifest(cfg.sids_dir, stage="sids")
    if cfg.ingest_dir:
        read_manifest(cfg.ingest_dir, stage="ingest")
    with timed(timings, "read"):
        ad_ids, emb = load_embeddings(cfg.sids_dir)
        active, ecpm, popularity, sid_version = _active_and_meta(cfg, ad_ids)
    keep = np.flatnonzero(active)
    if not len(keep):
        raise ArtifactError(f"{cfg.sids_dir}: no active ads to index")
    db = normalize(emb[keep])
    with timed(timings, "queries"):
        queries = history_queries(cfg, 2 * cfg.eval_queries)
        source = "user_histories" if queries is not None else "ad_noise"
        if queries is None:
            queries = eval_queries(normalize(emb), 2 * cfg.eval_queries, cfg.seed)
    with timed(timings, "build"):
        searcher, info = build(db, cfg, queries)
    info["query_source"] = source
    if info["recall_at_10"] < cfg.min_recall:
        log.warning("index: held-out recall@10 %.3f below min_recall %.2f (tuning recall "
                    "%.3f); raise num_leaves / reorder", info["recall_at_10"], cfg.min_recall,
                    info["tune_recall_at_10"])
    kept_ids = ad_ids[keep]
    # Popularity (engagements) first, eCPM breaks ties: the cold-start list.
    order = np.lexsort((-ecpm[keep], -popularity[keep]))[:cfg.fallback_size]
    version = _version(sid_version, kept_ids, info)
    info.update({"version": version, "sid_version": sid_version, "ads": int(len(keep)),
                 "sid_catalog": int(len(ad_ids)),  # ads with vectors: grows with add-ads
                 "dim": int(db.shape[1]), "popular_rows": order.tolist(),
                 "sids_dir": cfg.sids_dir,
                 # a dense head is only fused with an index of its own encoder's vectors
                 "encoder_version": sids_manifest.get("encoder_version")})

    with timed(timings, "write"):
        fs, path = resolve(cfg.out)
        fs.create_dir(path, recursive=True)
        tmp = tempfile.mkdtemp(prefix="leadre-scann-")
        try:
            searcher.serialize(tmp, relative_path=True)
            refuse_pickles(tmp)  # row-number doc ids: ScaNN must not have pickled any
            target = f"{path}/{SCANN_DIR}"
            if fs.get_file_info(target).type != pafs.FileType.NotFound:
                fs.delete_dir(target)
            fs.create_dir(target, recursive=True)
            pafs.copy_files(tmp, target, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        write_table(pa.table({"ad_id": pa.array(kept_ids.tolist(), pa.string()),
                              "ecpm": pa.array(ecpm[keep], pa.float32()),
                              "popularity": pa.array(popularity[keep], pa.float64())}),
                    cfg.out, ADS_TABLE)
        write_json(cfg.out, INDEX_JSON, info)
    summary = {"out": cfg.out, "version": version, "mode": info["mode"], "ads": int(len(keep)),
               "inactive_skipped": int(len(ad_ids) - len(keep)),
               "recall_at_10": info["recall_at_10"],
               "tune_recall_at_10": info["tune_recall_at_10"], "query_source": source,
               "query_params": info["query_params"], "build_s": info["build_s"]}
    return write_manifest(cfg.out, STAGE, inputs={"sids_dir": cfg.sids_dir,
                                                   "sids_version": sids_manifest.get("version"),
                                                   "ingest_dir": cfg.ingest_dir},
                          config=asdict(cfg), counts={"ads": int(len(keep)),
                                                      "inactive": int(len(ad_ids) - len(keep))},
                          timings=timings, extra={"version": version, "index": info,
                                                  "sid_version": sid_version,
                                                  "summary": summary,
                                                  "content": content_digest(cfg.out)})


def _version(sid_version: str, ad_ids: np.ndarray, info: dict) -> str:
    from leadre.sids.table import version_id

    return version_id(sid_version.encode(), "\n".join(ad_ids.tolist()).encode(),
                      json.dumps({k: info[k] for k in ("mode", "build_params")},
                                 sort_keys=True).encode())
