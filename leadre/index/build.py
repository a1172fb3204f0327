"""Stage 7, ``leadre index``: a ScaNN index over the embeddings of the *active* ads, for the
serving matcher (the searcher and :class:`~leadre.index.ann.AdIndex` live in
:mod:`leadre.index.ann`).

The matcher fills a user's generated candidates up to k with nearest active ads and answers
cache misses with a real-time nearest-neighbour query; both need an index that holds only ads
that may be shown. ScaNN cannot add or delete points in place (we never rely on it), so an
ad switching on or off means: rebuild this stage (seconds) and swap the directory into the
running matcher (``POST /admin/index`` or ``serve deploy`` with a new ``user_config``).

After the build, the query-time knobs (leaves searched, neighbours re-scored) are raised until
recall@10 against exact NumPy search reaches ``min_recall``, and stored with the index.

Layout of an index directory::

    <dir>/scann/            ScaNN's serialize(..., relative_path=True) output (relocatable)
    <dir>/ads/              parquet: row (ScaNN datapoint id) -> ad_id, eCPM, popularity
    <dir>/index.json        mode, query params, versions, dim, recall
    <dir>/manifest.json     stage "index"
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
        min_recall: query-time knobs are raised until recall@10 vs exact search reaches it.
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
        "help": "queries used to measure recall@10 (ads' own embeddings with noise)"})
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


def _tune(searcher, db: np.ndarray, queries: np.ndarray, truth: np.ndarray, mode: str,
          params: dict, cfg: IndexConfig) -> tuple[dict, float]:
    """Raise the query-time knobs until recall@10 >= min_recall (or they are maxed out)."""
    q = {k: v for k, v in params.items() if k in ("leaves_to_search", "pre_reorder_num_neighbors")}
    k = truth.shape[1]
    while True:
        found, _ = searcher.search_batched(queries, final_num_neighbors=k, **q)
        rec = recall_at(np.asarray(found), truth)
        if rec >= cfg.min_recall or mode == "brute_force":
            return q, rec
        grew = False
        if "leaves_to_search" in q and q["leaves_to_search"] < params.get("num_leaves", 0):
            q["leaves_to_search"] = min(params["num_leaves"], q["leaves_to_search"] * 2)
            grew = True
        if q.get("pre_reorder_num_neighbors", 0) < min(len(db), 2000):
            q["pre_reorder_num_neighbors"] = min(len(db), q["pre_reorder_num_neighbors"] * 2)
            grew = True
        if not grew:
            return q, rec


def eval_queries(emb: np.ndarray, n: int, seed: int, noise: float = 0.05) -> np.ndarray:
    """Realistic queries: embeddings of random ads (active or not) plus a little noise."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(emb), size=min(n, max(len(emb), 1)))
    q = emb[picks] + rng.normal(0, noise / math.sqrt(emb.shape[1]), (len(picks), emb.shape[1]))
    return normalize(q)


def build(db: np.ndarray, cfg: IndexConfig, queries: np.ndarray | None = None,
          k: int = 10) -> tuple[object, dict]:
    """Build + tune a searcher over ``db``; returns (searcher, info with recall and timings)."""
    mode = choose_mode(len(db), cfg.mode)
    t0 = time.perf_counter()
    searcher, params = build_searcher(db, mode, cfg, k)
    build_s = time.perf_counter() - t0
    if queries is None:
        queries = eval_queries(db, cfg.eval_queries, cfg.seed)
    truth = exact_topk(db, queries, k)
    query_params, recall = _tune(searcher, db, queries, truth, mode, params, cfg)
    return searcher, {"mode": mode, "build_params": params, "query_params": query_params,
                      "recall_at_10": round(recall, 4), "build_s": round(build_s, 3)}


def run(cfg: IndexConfig) -> dict:
    """Build the index of the active ads of ``cfg.sids_dir`` into ``cfg.out``."""
    timings: dict[str, float] = {}
    sids_manifest = read_manifest(cfg.sids_dir, stage="sids")
    with timed(timings, "read"):
        ad_ids, emb = load_embeddings(cfg.sids_dir)
        active, ecpm, popularity, sid_version = _active_and_meta(cfg, ad_ids)
    keep = np.flatnonzero(active)
    if not len(keep):
        raise ArtifactError(f"{cfg.sids_dir}: no active ads to index")
    db = normalize(emb[keep])
    with timed(timings, "build"):
        searcher, info = build(db, cfg, eval_queries(normalize(emb), cfg.eval_queries, cfg.seed))
    if info["recall_at_10"] < cfg.min_recall:
        log.warning("index: recall@10 %.3f below min_recall %.2f even at the largest query "
                    "settings; raise num_leaves / reorder", info["recall_at_10"], cfg.min_recall)
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
               "recall_at_10": info["recall_at_10"], "query_params": info["query_params"],
               "build_s": info["build_s"]}
    return write_manifest(cfg.out, STAGE, inputs={"sids_dir": cfg.sids_dir,
                                                   "sids_version": sids_manifest.get("version"),
                                                   "ingest_dir": cfg.ingest_dir},
                          config=asdict(cfg), counts={"ads": int(len(keep)),
                                                      "inactive": int(len(ad_ids) - len(keep))},
                          timings=timings, extra={"version": version, "index": info,
                                                  "summary": summary})


def _version(sid_version: str, ad_ids: np.ndarray, info: dict) -> str:
    from leadre.sids.table import version_id

    return version_id(sid_version.encode(), "\n".join(ad_ids.tolist()).encode(),
                      json.dumps({k: info[k] for k in ("mode", "build_params")},
                                 sort_keys=True).encode())
