"""The cold-start view of an eval (issue 24): recall and NDCG on cold and on warm targets.

With the cold-start split on (``leadre ingest --cold-fraction 0.1``), a share of the active ads
is held out of quantiser training and of every training interaction, so those ads appear only
as test targets (:func:`leadre.sids.build.load_cold_ads` names them). Every method's ranking
is then scored twice: on the rows whose target is cold, and on the rest, at ``k`` = the
largest cut of the eval capped at 10.

ID-only SASRec cannot rank an ad it never trained on: a cold ad is never a positive, so its
ID embedding learns nothing that could put it on top, and its cold recall is 0 by
construction, up to ties and chance scores among untrained embeddings; the report says so and
shows what was measured.
"""

from __future__ import annotations

from typing import Any, Sequence

from leadre.eval.metrics import ranking_metrics


def cold_warm_metrics(recs: Sequence[Sequence[str]], targets: Sequence[str],
                      cold: frozenset[str] | set[str], k: int = 10) -> dict[str, dict[str, Any]]:
    """``{"cold": {"targets": n, "recall@k": x, "ndcg@k": y}, "warm": {...}}``: the rows whose
    target is in ``cold``, and the others, each scored on its top ``k``. A group without rows
    has ``None`` for its metrics (not 0: nothing was measured)."""
    if len(recs) != len(targets):
        raise ValueError(f"{len(recs)} recommendation lists but {len(targets)} targets")
    out: dict[str, dict[str, Any]] = {}
    for name, wanted in (("cold", True), ("warm", False)):
        idx = [i for i, t in enumerate(targets) if (t in cold) == wanted]
        entry: dict[str, Any] = {"targets": len(idx), f"recall@{k}": None, f"ndcg@{k}": None}
        if idx:
            m = ranking_metrics([list(recs[i])[:k] for i in idx], [targets[i] for i in idx],
                                ks=(k,))
            entry[f"recall@{k}"], entry[f"ndcg@{k}"] = m[f"recall@{k}"], m[f"ndcg@{k}"]
        out[name] = entry
    return out


def cold_k(ks: Sequence[int]) -> int:
    """The cut of the cold/warm view: the eval's largest K, at most 10."""
    return min(10, max(ks))


def add_cold_warm(methods: dict[str, dict[str, Any]], ranked: dict[str, list[list[str]]],
                  targets: Sequence[str], sids_dir: str, ks: Sequence[int]) -> int:
    """When the S-IDs of ``sids_dir`` were built with a cold-start split, set
    ``methods[name]["cold"]`` and ``["warm"]`` (:func:`cold_warm_metrics`) for every method
    of ``ranked``. Returns the number of cold ads (0: the split is off, nothing is added)."""
    from leadre.sids.build import load_cold_ads

    cold = load_cold_ads(sids_dir)
    if not cold:
        return 0
    k = cold_k(ks)
    for name, recs in ranked.items():
        methods[name].update(cold_warm_metrics(recs, targets, cold, k))
    return len(cold)
