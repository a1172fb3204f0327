"""Matcher benchmark: the matcher's ScaNN search in-process vs NumPy exact search, at 100k and
1M ads (clustered synthetic embeddings shaped like the S-ID stage's: unit rows, dim 128).

For each size, in one run: index build time and mode (ScaNN's rules of thumb + recall tuning,
exactly as `leadre index` does), single-query p50/p99 latency of ScaNN and of exact NumPy
(matrix-vector product + argpartition), their ratio, and recall@10 against exact.

    .venv/bin/python bench/bench_matcher.py [--sizes 100000 1000000] [--queries 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _results import append
from leadre.index.ann import recall_at
from leadre.index.build import IndexConfig, build


def clustered(n: int, d: int, centers: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1000, q))


def bench(n: int, d: int, nq: int, seed: int = 0) -> dict:
    db = clustered(n, d, centers=max(64, int(n ** 0.5)), seed=seed)
    q = clustered(nq, d, centers=max(64, int(n ** 0.5)), seed=seed)  # same centres: realistic
    q = db[np.random.default_rng(seed + 1).integers(0, n, nq)] + 0.05 * q
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    t0 = time.perf_counter()
    searcher, info = build(db, IndexConfig(min_recall=0.9, eval_queries=500), q[:500])
    build_s = time.perf_counter() - t0
    params = {k: v for k, v in info["query_params"].items() if v is not None}
    t_scann, found = [], []
    for v in q:
        t = time.perf_counter()
        rows, _ = searcher.search(v, final_num_neighbors=10, **params)
        t_scann.append(time.perf_counter() - t)
        found.append(np.asarray(rows))
    t_exact, truth = [], []
    for v in q:
        t = time.perf_counter()
        s = db @ v
        part = np.argpartition(-s, 9)[:10]
        truth.append(part[np.argsort(-s[part])])
        t_exact.append(time.perf_counter() - t)
    rec = recall_at(np.stack(found), np.stack(truth))
    return {"n": n, "mode": info["mode"], "build_s": round(build_s, 1), "params": params,
            "scann_p50": pct(t_scann, 50), "scann_p99": pct(t_scann, 99),
            "exact_p50": pct(t_exact, 50), "exact_p99": pct(t_exact, 99), "recall": rec}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        r = bench(n, args.dim, args.queries)
        print(r, flush=True)
        rows.append(r)
    lines = ["| ads | mode (query params) | build s | ScaNN p50 / p99 ms | NumPy exact p50 / p99 ms "
             "| speed-up p50 | recall@10 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['mode']} {r['params']} | {r['build_s']} | "
                     f"{r['scann_p50']:.3f} / {r['scann_p99']:.3f} | {r['exact_p50']:.2f} / "
                     f"{r['exact_p99']:.2f} | {r['exact_p50'] / r['scann_p50']:.0f}x | "
                     f"{r['recall']:.3f} |")
    append("Matcher: ScaNN vs NumPy exact search (in-process, single query, k=10)",
           "\n".join(lines) + f"\n\nClustered unit vectors, dim {args.dim}, {args.queries} "
           "queries (ads' embeddings + noise), one thread per query; build includes recall "
           "tuning to >= 0.9. Shared 2-core machine: other work was running.")


if __name__ == "__main__":
    main()
