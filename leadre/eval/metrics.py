"""Offline ranking metrics for next-ad prediction (one or more target ads per eval row).

For a row with ranked recommendations ``r_1..r_n`` and target set ``T``:

* ``hr@K``      1 if any target is in the top K (HitRate; with one target = Recall@K).
* ``recall@K``  |top K ∩ T| / |T|.
* ``ndcg@K``    DCG / ideal DCG with binary gains, DCG = Σ_{i<=K, r_i ∈ T} 1 / log2(i + 1).
* ``coverage@K``  distinct ads recommended in any top K / active catalog size (catalog-level).
* ``diversity@K`` intra-list category diversity: share of pairs in the top K whose categories
  differ (0 = one category, 1 = all different); rows with < 2 items are skipped.
* ``novelty@K``  mean self-information -log2 p(ad) of the recommended ads, with p the
  add-one-smoothed share of training engagements (higher = less popular ads).
* ``ecpm@K``       mean eCPM of the top-K ads (business value of what is shown).
* ``value_hr@K``   eCPM-weighted hits: Σ_rows hit@K · eCPM(target) / Σ_rows eCPM(target).

All row-level metrics are averaged over rows. Value metrics are only reported when eCPM is
known (synthetic world), NaN eCPMs are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

KS: tuple[int, ...] = (1, 3, 5, 10)


@dataclass
class CatalogStats:
    """What the beyond-accuracy metrics need to know about ads, keyed by ad_id: categories
    as logged (``unknown`` included: it is a category for diversity), eCPMs, training
    popularity, and the size of the active catalog. Any mapping may be empty. Not the
    builder's :class:`leadre.prompts.Catalog` (per-ad S-IDs and the DPO sampling pools)."""

    category: Mapping[str, str]
    ecpm: Mapping[str, float]
    popularity: Mapping[str, int]  # training engagements per ad
    n_active: int


def _targets(t: str | Sequence[str]) -> list[str]:
    return [t] if isinstance(t, str) else list(t)


def ranking_metrics(recs: Sequence[Sequence[str]], targets: Sequence[str | Sequence[str]],
                    ks: Sequence[int] = KS) -> dict[str, float]:
    """hr@K, recall@K, ndcg@K averaged over rows."""
    if len(recs) != len(targets):
        raise ValueError(f"{len(recs)} recommendation lists but {len(targets)} targets")
    n = len(recs)
    out: dict[str, float] = {}
    if n == 0:
        return {f"{m}@{k}": float("nan") for k in ks for m in ("hr", "recall", "ndcg")}
    kmax = max(ks)
    disc = 1.0 / np.log2(np.arange(2, kmax + 2))
    hit = np.zeros((n, kmax), dtype=bool)
    n_t = np.zeros(n)
    for i, (r, t) in enumerate(zip(recs, targets)):
        tset = set(_targets(t))
        n_t[i] = len(tset)
        seen = set()
        for j, a in enumerate(list(r)[:kmax]):
            if a in tset and a not in seen:  # a repeated ad counts once
                hit[i, j] = True
            seen.add(a)
    for k in ks:
        h = hit[:, :k]
        ideal = np.array([disc[:int(min(m, k))].sum() for m in n_t])
        dcg = (h * disc[:k]).sum(1)
        out[f"hr@{k}"] = float(h.any(1).mean())
        out[f"recall@{k}"] = float(np.mean(np.where(n_t > 0, h.sum(1) / np.maximum(n_t, 1), 0)))
        out[f"ndcg@{k}"] = float(np.mean(np.where(ideal > 0, dcg / np.where(ideal > 0, ideal, 1), 0)))
    return out


def beyond_accuracy(recs: Sequence[Sequence[str]], targets: Sequence[str | Sequence[str]],
                    catalog: CatalogStats, ks: Sequence[int] = KS) -> dict[str, float]:
    """coverage, diversity, novelty and value metrics (see the module docstring)."""
    out: dict[str, float] = {}
    total_pop = float(sum(catalog.popularity.values()))
    n_items = max(catalog.n_active, len(catalog.popularity), 1)
    has_ecpm = any(v is not None and not math.isnan(v) for v in catalog.ecpm.values())

    def info(a: str) -> float:
        return -math.log2((catalog.popularity.get(a, 0) + 1) / (total_pop + n_items))

    def ecpm(a: str) -> float:
        v = catalog.ecpm.get(a)
        return float("nan") if v is None else float(v)

    for k in ks:
        top = [list(r)[:k] for r in recs]
        out[f"coverage@{k}"] = len({a for r in top for a in r}) / max(catalog.n_active, 1)
        if catalog.category:
            divs = []
            for r in top:
                cats = [catalog.category.get(a) for a in r]
                m = len(cats)
                if m < 2:
                    continue
                same = sum(cats[i] == cats[j] for i in range(m) for j in range(i + 1, m))
                divs.append(1.0 - same / (m * (m - 1) / 2))
            out[f"diversity@{k}"] = float(np.mean(divs)) if divs else float("nan")
        nov = [info(a) for r in top for a in r]
        out[f"novelty@{k}"] = float(np.mean(nov)) if nov else float("nan")
        if has_ecpm:
            vals = [ecpm(a) for r in top for a in r]
            vals = [v for v in vals if not math.isnan(v)]
            out[f"ecpm@{k}"] = float(np.mean(vals)) if vals else float("nan")
            num = den = 0.0
            for r, t in zip(top, targets):
                tv = [ecpm(a) for a in _targets(t)]
                tv = [v for v in tv if not math.isnan(v)]
                if not tv:
                    continue
                w = float(np.mean(tv))
                den += w
                num += w * any(a in set(_targets(t)) for a in r)
            out[f"value_hr@{k}"] = num / den if den > 0 else float("nan")
    return out


def all_metrics(recs: Sequence[Sequence[str]], targets: Sequence[str | Sequence[str]],
                catalog: CatalogStats | None = None, ks: Sequence[int] = KS) -> dict[str, float]:
    out = ranking_metrics(recs, targets, ks)
    if catalog is not None:
        out.update(beyond_accuracy(recs, targets, catalog, ks))
    out["rows"] = len(recs)
    return out
