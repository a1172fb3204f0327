"""Stage 7, ``leadre index``: a ScaNN index over the embeddings of the *active* ads, for the
serving matcher (the searcher and :class:`~leadre.index.ann.AdIndex` live in
:mod:`leadre.index.ann`).

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
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from leadre.artifacts import (ArtifactError, exists, join, read_manifest, read_table, resolve,
                              timed, write_json, write_manifest, write_table)
from leadre.config import ConfigError
from leadre.data.schema import ENGAGE
from leadre.index.ann import (ADS_TABLE, INDEX_JSON, SCANN_DIR, STAGE, build_searcher, choose_mode,
                              exact_topk, load_embeddings, normalize, recall_at)
from leadre.index.verify import content_digest, refuse_pickles

log = logging.getLogger(__name__)


@dataclass
class IndexConfig:
    """Configuration of stage 7, ``leadre index``: ScaNN over the active ads' embeddings.

    Parameters:
        sids_dir: output of ``leadre sids`` (its ``embeddings`` and ``sid_table`` are read).
        ingest_dir: optional output of ``leadre ingest``: its ``ads`` table supplies the
            *current* active flags (ads switched on/off since the S-IDs were built) and eCPM,
            its ``events`` the popularity used for the cold-start fallback list.
        out: index directory to write.
        mode: ``auto`` follows ScaNN's rules of thumb by size; ``brute_force`` / ``ah`` /
            ``tree_ah`` force one.
        min_recall: the cheapest query-time knobs whose recall@10 vs exact search reaches it
            on the tuning queries are kept; the manifest reports recall on held-out queries.
        eval_queries: queries in each of the tuning and the held-out set.
        history_events: events of a user's history per query (the matcher's own setting).
    """

    sids_dir: str = field(default="runs/sids", metadata={
        "help": "output directory of `leadre sids` (embeddings + S-ID table)"})
    ingest_dir: str | None = field(default=None, metadata={
        "help": "optional `leadre ingest` output: current active flags + eCPM (ads) and "
                "popularity (events) for the cold-start fallback"})
    out: str = field(default="runs/index", metadata={"help": "index directory to write"})
    mode: Literal["auto", "brute_force", "ah", "tree_ah"] = field(default="auto", metadata={
        "help": "auto: brute force < 20k ads, AH + rescoring < 100k, tree + AH + rescoring above "
                "(ScaNN's rules of thumb)"})
    num_leaves: int | None = field(default=None, metadata={
        "help": "tree partitions (tree_ah); default ~sqrt(#ads)"})
    leaves_to_search: int | None = field(default=None, metadata={
        "help": "initial partitions searched per query (tuned upwards to min_recall)"})
    reorder: int = field(default=100, metadata={
        "help": "candidates re-scored exactly after AH scoring"})
    anisotropic_threshold: float = field(default=0.2, metadata={
        "help": "AH anisotropic quantisation threshold (dot-product search)"})
    training_sample_size: int = field(default=100_000, metadata={
        "help": "points sampled to train the tree and the AH codebooks"})
    min_recall: float = field(default=0.9, metadata={
        "help": "target recall@10 vs exact search; query knobs are tuned until reached"})
    eval_queries: int = field(default=500, metadata={
        "help": "queries in each of the tuning and held-out sets (users' histories)"})
    history_events: int = field(default=20, metadata={
        "help": "events of a user's history per query (as the matcher builds them)"})
    fallback_size: int = field(default=200, metadata={
        "help": "length of the popularity list used when a user has no signal at all"})
    seed: int = field(default=0, metadata={"help": "random seed (eval queries)"})

    def __post_init__(self) -> None:
        if not 0.0 < self.min_recall <= 1.0:
            raise ConfigError(f"min_recall must be in (0, 1], got {self.min_recall}")
        if self.reorder < 10:
            raise ConfigError(f"reorder must be >= 10 (recall@10), got {self.reorder}")
        for name in ("num_leaves", "leaves_to_search"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 when set, got {v}")



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
        active = np.zeros(len(ad_ids), bool)  # the catalog is the truth: unknown ads are off
        active[pos[ok]] = act[ok]
        if "ecpm" in ads.column_names:
            e = ads.column("ecpm").fill_null(0.0).to_numpy(zero_copy_only=False)
            ecpm[pos[ok]] = e[ok]
        if exists(join(cfg.ingest_dir, "events")):
            ev = read_table(cfg.ingest_dir, "events").select(["action", "ad_id"])
            ev = ev.filter(pc.is_in(ev.column("action"), pa.array(ENGAGE)))
            counts = ev.group_by("ad_id").aggregate([("ad_id", "count")])
            for a, c in zip(counts.column("ad_id").to_pylist(),
                            counts.column("ad_id_count").to_pylist()):
                if a in idx:
                    popularity[idx[a]] = c
    return active, ecpm, popularity, table.version


def _ladder(start: int, stop: int) -> list[int]:
    out, v = [], max(1, start)
    while v < stop:
        out.append(v)
        v *= 2
    return out + [stop]


def _cost(n: int, params: dict, q: dict) -> float:
    """Work per query, to rank settings without timing them on a noisy machine: AH-scored
    points (the searched share of the partitions) plus exact re-scoring (~4x an AH point)."""
    share = q.get("leaves_to_search", 1) / params.get("num_leaves", 1)
    return n * share + 4 * q.get("pre_reorder_num_neighbors", 0)


def _tune(searcher, db: np.ndarray, queries: np.ndarray, truth: np.ndarray, mode: str,
          params: dict, cfg: IndexConfig) -> tuple[dict, float]:
    """The cheapest (by :func:`_cost`) query-time setting whose recall@10 on ``queries``
    reaches ``min_recall``; the best-recall setting when none does."""
    k = truth.shape[1]
    if mode == "brute_force":
        found, _ = searcher.search_batched(queries, final_num_neighbors=k)
        return {}, recall_at(np.asarray(found), truth)
    n = len(db)
    reorders = _ladder(max(k, cfg.reorder // 2), min(n, 4000))
    # From ~1% of the partitions up: history queries sit near partition centres, so few
    # leaves often suffice, and ScaNN's default (5%) would cost several times more.
    leaves = _ladder(max(1, params["num_leaves"] // 100), params["num_leaves"]) \
        if mode == "tree_ah" else [None]
    best = None  # (meets target, -cost or recall, params, recall)
    for lv in leaves:
        for ro in reorders:
            q = {"pre_reorder_num_neighbors": ro}
            if lv is not None:
                q["leaves_to_search"] = lv
            found, _ = searcher.search_batched(queries, final_num_neighbors=k, **q)
            rec = recall_at(np.asarray(found), truth)
            key = (rec >= cfg.min_recall, -_cost(n, params, q) if rec >= cfg.min_recall
                   else rec)
            if best is None or key > best[0]:
                best = (key, q, rec)
            if rec >= cfg.min_recall:
                break  # more re-scoring only costs more at these leaves
    return best[1], best[2]


def eval_queries(emb: np.ndarray, n: int, seed: int, noise: float = 0.05) -> np.ndarray:
    """Fallback queries (no user histories at hand): embeddings of random ads (active or
    not) plus a little noise."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(emb), size=min(n, max(len(emb), 1)))
    q = emb[picks] + rng.normal(0, noise / math.sqrt(emb.shape[1]), (len(picks), emb.shape[1]))
    return normalize(q)


def history_queries(cfg: IndexConfig, n: int) -> np.ndarray | None:
    """Up to ``n`` real-time queries built exactly as the matcher builds them (each user's
    last ``history_events`` events -> :class:`QueryBuilder`), users in a seeded random
    order; None without an ingest directory holding events."""
    if not cfg.ingest_dir or not exists(join(cfg.ingest_dir, "events")):
        return None
    from leadre.index.query import QueryBuilder
    from leadre.serve.context import merge_events, user_contexts

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


def build(db: np.ndarray, cfg: IndexConfig, queries: np.ndarray | None = None,
          k: int = 10) -> tuple[object, dict]:
    """Build + tune a searcher over ``db``; returns (searcher, info with recall and timings).
    ``queries`` (default: :func:`eval_queries`) are split in two: the first half tunes the
    query-time knobs, the second measures the recall that is reported."""
    mode = choose_mode(len(db), cfg.mode)
    t0 = time.perf_counter()
    searcher, params = build_searcher(db, mode, cfg, k)
    build_s = time.perf_counter() - t0
    if queries is None:
        queries = eval_queries(db, 2 * cfg.eval_queries, cfg.seed)
    half = max(1, len(queries) // 2)
    tune, held = queries[:half], queries[half:] if len(queries) > 1 else queries
    t1 = time.perf_counter()
    query_params, tune_recall = _tune(searcher, db, tune, exact_topk(db, tune, k), mode, params,
                                      cfg)
    found, _ = searcher.search_batched(held, final_num_neighbors=k, **query_params)
    recall = recall_at(np.asarray(found), exact_topk(db, held, k))
    return searcher, {"mode": mode, "build_params": params, "query_params": query_params,
                      "recall_at_10": round(recall, 4), "tune_recall_at_10": round(tune_recall, 4),
                      "queries": {"tune": len(tune), "held_out": len(held)},
                      "build_s": round(build_s, 3), "tune_s": round(time.perf_counter() - t1, 3)}


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
                 "dim": int(db.shape[1]), "popular_rows": order.tolist(),
                 "sids_dir": cfg.sids_dir})

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
