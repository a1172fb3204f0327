"""The ScaNN wrapper: searchers over unit vectors (dot product) built and tuned to a target
recall, exact search and recall for checking them. It lives with the vectors it searches (the
``sids`` stage writes the ad embeddings); the ``index`` stage, ``eval``'s embedding-ANN
baseline and the serving matcher all use it from here.

Algorithm choice follows ScaNN's own rules of thumb: brute force below 20k points (as fast, and
exact); asymmetric hashing (AH, 2 dims per block) + exact re-scoring below 100k; above that a
partitioning tree with ~sqrt(n) leaves in front of AH + re-scoring.

After the build, the query-time knobs (leaves searched, neighbours re-scored) are tuned on one
query set to the cheapest setting whose recall@10 against exact NumPy search reaches
``min_recall``, and recall is then *reported on another* (held-out) set.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from leadre.artifacts import read_table
from leadre.config import ConfigError

# ScaNN's rules of thumb for the algorithm by number of points.
BRUTE_FORCE_BELOW = 20_000
AH_ONLY_BELOW = 100_000


def choose_mode(n: int, mode: str = "auto") -> str:
    if mode != "auto":
        return mode
    if n < BRUTE_FORCE_BELOW:
        return "brute_force"
    return "ah" if n < AH_ONLY_BELOW else "tree_ah"


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def load_embeddings(sids_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """(ad_ids object array, (n, d) float32 unit rows) from a sids directory."""
    t = read_table(sids_dir, "embeddings")
    col = t.column("embedding").combine_chunks()
    dim = col.type.list_size
    emb = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    return np.asarray(t.column("ad_id").to_pylist(), dtype=object), emb


def exact_topk(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows by dot product (NumPy), best first."""
    return top_columns(queries @ db.T, min(k, db.shape[0]))


def top_columns(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row of ``scores``, the columns of its ``k`` highest scores, best first."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(scores, part, 1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(part, order, 1)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.sum(hits) / truth.size) if truth.size else 1.0


def build_searcher(db: np.ndarray, mode: str, cfg: AnnConfig, k: int = 10):
    """A ScaNN searcher over ``db`` (unit rows, dot product) for ``mode``."""
    import scann

    n = db.shape[0]
    b = scann.scann_ops_pybind.builder(db, max(1, min(k, n)), "dot_product")
    sample = min(cfg.training_sample_size, n)
    if mode == "brute_force":
        return b.score_brute_force().build(), {}
    if mode == "tree_ah":
        leaves = cfg.num_leaves or max(2, int(round(math.sqrt(n))))
        leaves = min(leaves, max(2, n // 50))
        search = cfg.leaves_to_search or max(1, leaves // 20)
        b = b.tree(num_leaves=leaves, num_leaves_to_search=search,
                   training_sample_size=sample)
        params = {"num_leaves": leaves, "leaves_to_search": search}
    else:
        params = {}
    b = b.score_ah(2, anisotropic_quantization_threshold=cfg.anisotropic_threshold,
                   training_sample_size=sample)
    b = b.reorder(max(cfg.reorder, k))
    params["pre_reorder_num_neighbors"] = max(cfg.reorder, k)
    return b.build(), params


@dataclass
class AnnConfig:
    """How a ScaNN searcher is built and tuned.

    Parameters:
        mode: ``auto`` follows ScaNN's rules of thumb by size; ``brute_force`` / ``ah`` /
            ``tree_ah`` force one.
        num_leaves / leaves_to_search: the tree's partitions and those searched per query
            (tuned upwards to ``min_recall``).
        reorder: candidates re-scored exactly after AH scoring.
        anisotropic_threshold / training_sample_size: AH quantisation settings.
        min_recall: the cheapest query-time knobs whose recall@10 vs exact search reaches it
            on the tuning queries are kept; recall is reported on held-out queries.
        eval_queries: queries in each of the tuning and the held-out set.
        seed: random seed of the fallback queries.
    """

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
          params: dict, cfg: AnnConfig) -> tuple[dict, float]:
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


def build(db: np.ndarray, cfg: AnnConfig, queries: np.ndarray | None = None,
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
