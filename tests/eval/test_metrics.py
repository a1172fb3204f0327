"""Metrics equal hand-computed values on crafted cases."""

from __future__ import annotations

import math

import pytest

import numpy as np

from leadre.eval.metrics import (CatalogStats, all_metrics, beyond_accuracy, bootstrap_ci,
                                 ranking_metrics, ranking_rows)

RECS = [["a", "b", "c"], ["d", "e", "f"], ["g", "a", "h"]]
TARGETS = ["b", "x", "h"]


def test_hit_rate_recall_ndcg_single_target():
    m = ranking_metrics(RECS, TARGETS, ks=(1, 2, 3))
    assert m["hr@1"] == 0.0 and m["ndcg@1"] == 0.0
    assert m["hr@2"] == pytest.approx(1 / 3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 3)
    assert m["hr@3"] == pytest.approx(2 / 3) == m["recall@3"]
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)


def test_multi_target_recall_and_ndcg():
    m = ranking_metrics([["a", "b", "z"]], [["b", "c"]], ks=(1, 2, 3))
    assert m["hr@1"] == 0 and m["hr@2"] == 1
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    # A repeated hit counts once; a perfect list scores 1.
    assert ranking_metrics([["b", "b"]], [["b"]], ks=(2,))["ndcg@2"] == pytest.approx(1.0)
    assert ranking_metrics([["c", "b"]], [["b", "c"]], ks=(2,))["ndcg@2"] == pytest.approx(1.0)


def test_beyond_accuracy():
    cat = CatalogStats(category={"a": "X", "b": "X", "c": "Y", "d": "Y", "e": "Y", "f": "Y",
                            "g": "Z", "h": "Z"},
                  ecpm={"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0, "f": 6.0, "g": 7.0,
                        "h": 8.0, "x": 10.0},
                  popularity={"a": 3, "b": 1}, n_active=8)
    m = beyond_accuracy(RECS, TARGETS, cat, ks=(1, 3))
    assert m["coverage@1"] == pytest.approx(3 / 8)  # a, d, g
    assert m["coverage@3"] == pytest.approx(8 / 8)
    # [X,X,Y] -> 2/3 differ; [Y,Y,Y] -> 0; [Z,X,Z] -> 2/3.
    assert m["diversity@3"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    assert math.isnan(m["diversity@1"])
    # p(a) = (3+1)/(4+8), p(d) = p(g) = 1/12.
    assert m["novelty@1"] == pytest.approx((math.log2(3) + 2 * math.log2(12)) / 3)
    assert m["ecpm@1"] == pytest.approx((1 + 4 + 7) / 3)
    assert m["ecpm@3"] == pytest.approx((1 + 2 + 3 + 4 + 5 + 6 + 7 + 1 + 8) / 9)
    # Hits at 3: b (2.0) and h (8.0) out of b + x + h = 20.
    assert m["value_hr@3"] == pytest.approx(10 / 20)
    assert m["value_hr@1"] == 0.0


def test_no_ecpm_no_value_metrics_and_row_count():
    cat = CatalogStats(category={}, ecpm={}, popularity={}, n_active=10)
    m = all_metrics(RECS, TARGETS, cat, ks=(3,))
    assert "ecpm@3" not in m and "value_hr@3" not in m and "diversity@3" not in m
    assert m["rows"] == 3
    with pytest.raises(ValueError):
        ranking_metrics(RECS, TARGETS[:2])


def test_per_row_metrics_average_to_the_reported_ones():
    rows = ranking_rows(RECS, TARGETS, ks=(1, 2, 3))
    assert rows["hr@3"].tolist() == [1.0, 0.0, 1.0]
    assert rows["ndcg@2"] == pytest.approx([1 / math.log2(3), 0.0, 0.0])
    means = ranking_metrics(RECS, TARGETS, ks=(1, 2, 3))
    assert means == {k: pytest.approx(float(v.mean())) for k, v in rows.items()}
    assert math.isnan(ranking_metrics([], [], ks=(3,))["hr@3"])


def test_bootstrap_ci_over_users():
    hits = np.array([1.0] * 100 + [0.0] * 300)  # 400 users, HR = 0.25
    users = [f"u{i}" for i in range(400)]
    lo, hi = bootstrap_ci({"hr@10": hits}, users, resamples=1000, seed=0)["hr@10"]
    # normal approximation: 0.25 +- 1.96 * sqrt(0.25 * 0.75 / 400) = [0.208, 0.292]
    assert 0.19 < lo < 0.22 < 0.28 < hi < 0.31
    assert bootstrap_ci({"hr@10": hits}, users, 1000, seed=0)["hr@10"] == [lo, hi]  # seeded
    assert bootstrap_ci({"hr@10": hits}, users, 1000, seed=1)["hr@10"] != [lo, hi]
    # Resampled by user: every user's row twice is the same evidence, the same interval;
    # the same rows taken as 800 independent users would give a narrower one.
    twice = np.repeat(hits, 2)
    assert bootstrap_ci({"hr@10": twice}, np.repeat(users, 2), 1000, 0)["hr@10"] == \
        pytest.approx([lo, hi])
    lo8, hi8 = bootstrap_ci({"hr@10": twice}, None, 1000, 0)["hr@10"]
    assert hi8 - lo8 < 0.8 * (hi - lo)
    # row order does not matter when users are given
    perm = np.random.default_rng(0).permutation(400)
    assert bootstrap_ci({"hr@10": hits[perm]}, [users[i] for i in perm], 1000, 0)["hr@10"] == \
        pytest.approx([lo, hi])
    assert all(math.isnan(x) for x in bootstrap_ci({"hr@10": np.zeros(0)}, [], 10)["hr@10"])


def test_difference_ci_is_paired_over_the_same_users():
    from leadre.eval.metrics import difference_ci

    rng = np.random.default_rng(0)
    n = 400
    targets = [f"t{i}" for i in range(n)]
    users = [f"u{i}" for i in range(n)]
    # theirs hits a random 40%; ours hits the same rows plus 5% more: a small, sure gain
    base = rng.random(n) < 0.4
    extra = (~base) & (rng.random(n) < 0.08)
    theirs = [[t] if b else ["x"] for t, b in zip(targets, base)]
    ours = [[t] if b or e else ["x"] for t, b, e in zip(targets, base, extra)]
    d = difference_ci(ours, theirs, targets, users, k=10, resamples=1000, seed=0)
    mean, lo, hi = d["hr@10"]
    assert mean == pytest.approx(extra.mean())
    assert 0 < lo < mean < hi  # paired: the gain is clear although the two HRs' own
    one = bootstrap_ci({"a": base.astype(float)}, users, 1000, 0)["a"]  # intervals overlap
    assert one[1] - one[0] > 2 * (hi - lo)
    assert difference_ci(theirs, theirs, targets, users, 10, 200)["ndcg@10"] == [0.0, 0.0, 0.0]


def test_all_metrics_puts_an_interval_next_to_every_hr_and_ndcg():
    m = all_metrics(RECS, TARGETS, ks=(1, 3), users=["a", "b", "c"], ci_resamples=200)
    assert {c for c in m if c.endswith("_ci")} == {"hr@1_ci", "hr@3_ci", "ndcg@1_ci", "ndcg@3_ci"}
    lo, hi = m["hr@3_ci"]
    assert 0 <= lo <= m["hr@3"] <= hi <= 1
    assert "hr@3_ci" not in all_metrics(RECS, TARGETS, ks=(3,))
