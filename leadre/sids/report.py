"""Quality numbers for Semantic IDs: codebook use, collisions, and semantic sanity checks."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np


def level_stats(codes: np.ndarray, codebook_sizes: Sequence[int]) -> list[dict]:
    """Per level: utilisation (share of codes used), entropy of code usage in bits and as a
    share of the maximum log2(K), and the largest code's share of ads."""
    out = []
    for level, k in enumerate(codebook_sizes):
        counts = np.bincount(codes[:, level], minlength=k).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        entropy = float(-(p * np.log2(p)).sum())
        out.append({
            "level": level,
            "codebook_size": int(k),
            "used": int((counts > 0).sum()),
            "utilisation": round(float((counts > 0).mean()), 4),
            "entropy_bits": round(entropy, 4),
            "entropy_norm": round(float(entropy / np.log2(k)), 4) if k > 1 else 1.0,
            "max_share": round(float(counts.max() / counts.sum()), 4),
        })
    return out


def collision_stats(codes: np.ndarray) -> dict:
    """Collisions before disambiguation: share of ads whose code tuple another ad also has,
    the share of ads that are not the first of their tuple (need e_k > 0), largest group."""
    if len(codes) == 0:
        return {"collision_rate": 0.0, "duplicate_rate": 0.0, "max_group": 0, "unique_prefixes": 0}
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    per_ad = counts[inverse.ravel()]
    return {
        "collision_rate": round(float((per_ad > 1).mean()), 4),
        "duplicate_rate": round(float(1 - len(counts) / len(codes)), 4),
        "max_group": int(counts.max()),
        "unique_prefixes": int(len(counts)),
    }


def same_category_rate(groups: np.ndarray, categories: Sequence[str]) -> dict:
    """P(two ads share a category | they share a group id) vs. for two random ads.

    Counted over all unordered pairs: sum_g sum_c n_gc(n_gc-1)/2 / sum_g n_g(n_g-1)/2; the
    random baseline is the same formula with one group."""
    cats = np.unique(np.asarray(categories, dtype=object).astype(str), return_inverse=True)[1]

    def pair_rate(g: np.ndarray) -> float:
        joint = Counter(zip(g.tolist(), cats.tolist()))
        sizes = Counter(g.tolist())
        same = sum(n * (n - 1) for n in joint.values())
        total = sum(n * (n - 1) for n in sizes.values())
        return same / total if total else float("nan")

    within = pair_rate(np.asarray(groups))
    rand = pair_rate(np.zeros(len(cats), dtype=np.int64))
    return {"same_code_pairs": round(within, 4), "random_pairs": round(rand, 4),
            "lift": round(within / rand, 2) if rand else float("nan")}


def knn_category_purity(emb: np.ndarray, categories: Sequence[str], k: int = 10,
                        block: int = 2048) -> float:
    """Mean share of each ad's k cosine nearest neighbours (itself excluded) that have its
    category. Brute force in blocks: for benchmarking catalogs of up to ~10^5 ads."""
    cats = np.unique(np.asarray(categories, dtype=object).astype(str), return_inverse=True)[1]
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    hits = 0.0
    for start in range(0, len(emb), block):
        sims = emb[start:start + block] @ emb.T
        idx = np.arange(start, min(start + block, len(emb)))
        sims[idx - start, idx] = -np.inf
        nn = np.argpartition(-sims, k, axis=1)[:, :k]
        hits += (cats[nn] == cats[idx, None]).sum()
    return float(hits / (len(emb) * k))
