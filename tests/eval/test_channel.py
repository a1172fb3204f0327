"""The eval stage's breakdowns: metrics by ad-history length, and LEADRE as an extra retrieval
channel beside SASRec."""

import pytest

from leadre.eval.channel import channel_report, history_groups, merge_channel
from leadre.eval.metrics import CatalogStats


def test_history_groups_split_users_by_ad_history_length():
    recs = [["a", "b"], ["c"], ["d"], ["x"]]
    targets = ["a", "z", "d", "q"]
    histories = [["h"], ["h", "i", "j"], ["h"] * 4, ["h"] * 9]
    g = history_groups(recs, targets, histories, [3])
    assert g["ad_history<=3"]["rows"] == 2 and g["ad_history<=3"]["hr@10"] == 0.5
    assert g["ad_history>3"]["rows"] == 2 and g["ad_history>3"]["hr@10"] == 0.5
    assert g["ad_history<=3"]["ndcg@10"] == pytest.approx(0.5)


def test_merged_channel_keeps_the_budget_and_drops_duplicates():
    base = ["s1", "s2", "s3", "s4", "s5", "s6"]
    extra = ["g1", "s1", "g2"]
    # top-2 of each, deduplicated, then filled from the base ranking up to 2k = 4
    assert merge_channel(base, extra, 2) == ["s1", "s2", "g1", "s3"]
    assert merge_channel(base, ["s2", "s1"], 2) == ["s1", "s2", "s3", "s4"]


def test_channel_report_measures_what_the_extra_channel_adds():
    catalog = CatalogStats(category={}, ecpm={}, popularity={"s1": 5}, n_active=10)
    sasrec = [["s1", "s2", "s3", "s4"], ["s1", "s2", "s3", "s4"]]
    llm = [["t1", "s1"], ["g9", "g8"]]
    targets = ["t1", "s4"]
    r = channel_report(llm, sasrec, targets, catalog, k=2)
    # SASRec's top-4 finds row 2's target; LEADRE's top-2 finds row 1's; merged finds both
    assert r["sasrec"]["recall@4"] == 0.5 and r["leadre"]["recall@2"] == 0.5
    assert r["sasrec@2+leadre@2"]["recall@4"] == 0.5  # row 2's s4 was pushed out by g9, g8
    assert r["incremental_recall@4"] == 0.0 and r["rows"] == 2
    assert r["sasrec@2+leadre@2"]["coverage@4"] == 0.6  # s1 s2 t1 s3 / g9 g8 -> 6 of 10


def test_channel_gain_has_a_paired_bootstrap_interval():
    catalog = CatalogStats(category={}, ecpm={}, popularity={}, n_active=10)
    n = 300
    targets = [f"t{i}" for i in range(n)]
    # SASRec never finds the target; LEADRE finds it for every third user: the merged
    # channel's gain is 1/3 and its interval excludes 0
    sasrec = [["s1", "s2", "s3", "s4"]] * n
    llm = [[t] if i % 3 == 0 else ["g"] for i, t in enumerate(targets)]
    r = channel_report(llm, sasrec, targets, catalog, k=2, users=[f"u{i}" for i in range(n)],
                       resamples=500)
    lo, hi = r["incremental_recall@4_ci"]
    assert r["incremental_recall@4"] == pytest.approx(1 / 3)
    assert 0.2 < lo < 1 / 3 < hi < 0.45
    assert channel_report(llm, sasrec, targets, catalog, k=2)["incremental_recall@4_ci"] is None
