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

All row-level metrics are averaged over rows; :func:`bootstrap_ci` gives the confidence
interval of such a mean by resampling users. Value metrics are only reported when eCPM is
known (synthetic world), NaN eCPMs are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

KS: tuple[int, ...] = (1, 3, 5, 10)
CI_LEVEL = 0.95  # of every confidence interval the evaluator reports


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


def ranking_rows(recs: Sequence[Sequence[str]], targets: Sequence[str | Sequence[str]],
                 ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """hr@K, recall@K, ndcg@K of every row (arrays of ``len(recs)`` floats)."""
    if len(recs) != len(targets):
        raise ValueError(f"{len(recs)} recommendation lists but {len(targets)} targets")
    n = len(recs)
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
    out: dict[str, np.ndarray] = {}
    for k in ks:
        h = hit[:, :k]
        ideal = np.array([disc[:int(min(m, k))].sum() for m in n_t])
        dcg = (h * disc[:k]).sum(1)
        out[f"hr@{k}"] = h.any(1).astype(float)
        out[f"recall@{k}"] = np.where(n_t > 0, h.sum(1) / np.maximum(n_t, 1), 0.0)
        out[f"ndcg@{k}"] = np.where(ideal > 0, dcg / np.where(ideal > 0, ideal, 1), 0.0)
    return out


def ranking_metrics(recs: Sequence[Sequence[str]], targets: Sequence[str | Sequence[str]],
                    ks: Sequence[int] = KS) -> dict[str, float]:
    """hr@K, recall@K, ndcg@K averaged over rows."""
    return _means(ranking_rows(recs, targets, ks))


def _means(per_row: Mapping[str, np.ndarray]) -> dict[str, float]:
    return {name: float(v.mean()) if len(v) else float("nan") for name, v in per_row.items()}


def bootstrap_ci(per_row: Mapping[str, np.ndarray], users: Sequence[str] | None = None,
                 resamples: int = 1000, seed: int = 0, level: float = CI_LEVEL
                 ) -> dict[str, list[float]]:
    """Percentile bootstrap interval of each row-mean in ``per_row``, resampling *users*
    with replacement (all rows of a drawn user count, so users with several rows are not
    treated as independent draws; ``users=None``: one user per row). The same seed draws
    the same resamples for every method scored on the same rows, so their intervals are
    paired."""
    names = list(per_row)
    n_rows = len(next(iter(per_row.values()))) if names else 0
    if not names or n_rows == 0 or resamples < 1:
        return {name: [float("nan"), float("nan")] for name in names}
    if users is None:
        group = np.arange(n_rows)
    else:
        _, group = np.unique(np.asarray(list(users), dtype=object).astype(str),
                             return_inverse=True)
    n_users = int(group.max()) + 1
    values = np.stack([np.asarray(per_row[name], float) for name in names], 1)
    sums = np.zeros((n_users, len(names)))
    np.add.at(sums, group, values)
    counts = np.bincount(group, minlength=n_users).astype(float)
    rng = np.random.default_rng(seed)
    means = np.empty((resamples, len(names)))
    chunk = max(1, 4_000_000 // n_users)  # bounds the (chunk, users) weight matrix
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        draws = rng.integers(0, n_users, (m, n_users)) + n_users * np.arange(m)[:, None]
        w = np.bincount(draws.ravel(), minlength=m * n_users).reshape(m, n_users).astype(float)
        means[start:start + m] = (w @ sums) / np.maximum(w @ counts, 1.0)[:, None]
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(means, [tail, 100.0 - tail], axis=0)
    return {name: [float(a), float(b)] for name, a, b in zip(names, lo, hi)}


def difference_ci(ours: Sequence[Sequence[str]], theirs: Sequence[Sequence[str]],
                  targets: Sequence[str | Sequence[str]], users: Sequence[str] | None = None,
                  k: int = 10, resamples: int = 1000, seed: int = 0
                  ) -> dict[str, list[float]]:
    """``{"hr@k": [mean, lo, hi], "ndcg@k": ...}``: the difference ours - theirs, scored on
    the same rows, with a paired bootstrap interval (each resample draws the same users for
    both methods, so it is the interval of the difference, not two overlapping ones)."""
    a, b = ranking_rows(ours, targets, (k,)), ranking_rows(theirs, targets, (k,))
    diff = {name: a[name] - b[name] for name in (f"hr@{k}", f"ndcg@{k}")}
    ci = bootstrap_ci(diff, users, resamples, seed)
    return {name: [float(v.mean()), *ci[name]] for name, v in diff.items()}


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
                catalog: CatalogStats | None = None, ks: Sequence[int] = KS, *,
                users: Sequence[str] | None = None, ci_resamples: int = 0,
                seed: int = 0) -> dict[str, Any]:
    """Every metric; with ``ci_resamples``, also ``hr@K_ci`` and ``ndcg@K_ci``: the
    :data:`CI_LEVEL` bootstrap interval over ``users`` (see :func:`bootstrap_ci`), ``[lo, hi]``."""
    per_row = ranking_rows(recs, targets, ks)
    out: dict[str, Any] = _means(per_row)
    if ci_resamples:
        wanted = {name: v for name, v in per_row.items() if name.split("@")[0] in ("hr", "ndcg")}
        for name, ci in bootstrap_ci(wanted, users, ci_resamples, seed).items():
            out[f"{name}_ci"] = ci
    if catalog is not None:
        out.update(beyond_accuracy(recs, targets, catalog, ks))
    out["rows"] = len(recs)
    return out
