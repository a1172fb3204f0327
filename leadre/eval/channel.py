"""Two views of an eval that a single HR@10 hides.

* **By ad-history length** (:func:`history_groups`): HR/NDCG@10 for users with at most N ad
  engagements before the target, and for the rest. The paper's claim is that content-domain
  behaviour helps most where the ad history is sparse.
* **As a retrieval channel** (:func:`channel_report`): an ad system asks retrieval for hundreds
  of candidates and runs LEADRE beside ID-based retrieval. With ``k`` = 50: Recall@{10,50,100}
  of SASRec and LEADRE, and of SASRec's top-``k`` merged with LEADRE's top-``k`` (duplicates
  dropped, then filled up from SASRec's own ranking to ``2k``) against SASRec's top-``2k``
  alone: the same number of candidates, so the difference is what the channel adds. With
  ``users``, the difference carries a paired bootstrap interval over users.
"""

from __future__ import annotations

from typing import Any, Sequence

from leadre.eval.metrics import CatalogStats, beyond_accuracy, bootstrap_ci, ranking_metrics, \
    ranking_rows


def history_groups(recs: Sequence[Sequence[str]], targets: Sequence[str],
                   histories: Sequence[Sequence[str]], thresholds: Sequence[int], k: int = 10
                   ) -> dict[str, dict[str, float]]:
    """``{"ad_history<=N": {rows, hr@k, ndcg@k}, "ad_history>N": ...}`` per threshold N."""
    out: dict[str, dict[str, float]] = {}
    lengths = [len(h) for h in histories]
    for n in thresholds:
        for name, keep in ((f"ad_history<={n}", [x <= n for x in lengths]),
                           (f"ad_history>{n}", [x > n for x in lengths])):
            idx = [i for i, kept in enumerate(keep) if kept]
            m = ranking_metrics([recs[i] for i in idx], [targets[i] for i in idx], ks=(k,))
            out[name] = {"rows": len(idx), f"hr@{k}": m[f"hr@{k}"], f"ndcg@{k}": m[f"ndcg@{k}"]}
    return out


def merge_channel(base: Sequence[str], extra: Sequence[str], k: int) -> list[str]:
    """``base[:k]`` then ``extra[:k]``, without duplicates, filled from ``base`` to ``2k``."""
    out: list[str] = []
    seen: set[str] = set()
    for a in [*base[:k], *extra[:k], *base[k:]]:
        if a not in seen:
            out.append(a)
            seen.add(a)
        if len(out) == 2 * k:
            break
    return out


def channel_report(llm: Sequence[Sequence[str]], sasrec: Sequence[Sequence[str]],
                   targets: Sequence[str], catalog: CatalogStats, k: int = 50,
                   users: Sequence[str] | None = None, resamples: int = 0, seed: int = 0
                   ) -> dict[str, Any]:
    """Recall, coverage and novelty of SASRec, LEADRE and the merged channel (module doc)."""
    big = 2 * k
    merged = [merge_channel(s, g, k) for s, g in zip(sasrec, llm)]

    def describe(recs: Sequence[Sequence[str]], ks: tuple[int, ...]) -> dict[str, float]:
        m = ranking_metrics(recs, targets, ks=ks)
        extra = beyond_accuracy(recs, targets, catalog, ks=(max(ks),))
        return {**{f"recall@{x}": m[f"recall@{x}"] for x in ks},
                f"coverage@{max(ks)}": extra[f"coverage@{max(ks)}"],
                f"novelty@{max(ks)}": extra[f"novelty@{max(ks)}"]}

    sas = describe(sasrec, tuple(x for x in (10, k, big) if x <= big))
    ours = describe(llm, tuple(x for x in (10, k) if x <= k))
    both = describe(merged, (big,))
    gain = both[f"recall@{big}"] - sas[f"recall@{big}"]
    ci = None
    if resamples:
        key = f"recall@{big}"
        diff = ranking_rows(merged, targets, (big,))[key] - \
            ranking_rows([s[:big] for s in sasrec], targets, (big,))[key]
        ci = bootstrap_ci({key: diff}, users, resamples, seed)[key]
    return {"k": k, "rows": len(targets), "sasrec": sas, "leadre": ours,
            f"sasrec@{k}+leadre@{k}": both,
            f"incremental_recall@{big}": gain, f"incremental_recall@{big}_ci": ci,
            f"relative_gain@{big}": gain / sas[f"recall@{big}"] if sas[f"recall@{big}"] else None}
