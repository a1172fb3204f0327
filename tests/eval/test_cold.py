"""The cold/warm view of an eval (issue 24, item 4) on hand-made rankings: which rows count as
cold, recall and NDCG of each group, the methods' entries and the report's table."""

from __future__ import annotations

import math

import pytest

from leadre.artifacts import write_manifest
from leadre.eval.cold import add_cold_warm, cold_k, cold_warm_metrics
from leadre.eval.report import markdown_report
from leadre.sids.build import load_cold_ads

import test_evaluate  # its artifact directories: tiny model, prompts, S-IDs

dirs = test_evaluate.dirs  # the same module-scoped fixture, here too

RECS = [["a", "c1", "b"],   # target c1 (cold) at rank 2
        ["c2", "a", "b"],   # target c3 (cold): missed
        ["b", "a", "x"],    # target a (warm) at rank 2
        ["a", "b", "x"]]    # target a (warm) at rank 1
TARGETS = ["c1", "c3", "a", "a"]
COLD = frozenset({"c1", "c2", "c3"})


def test_targets_split_into_cold_and_warm_with_hand_computed_metrics():
    m = cold_warm_metrics(RECS, TARGETS, COLD, k=3)
    assert m["cold"]["targets"] == 2 and m["warm"]["targets"] == 2
    assert m["cold"]["recall@3"] == pytest.approx(0.5)
    assert m["cold"]["ndcg@3"] == pytest.approx((1 / math.log2(3)) / 2)
    assert m["warm"]["recall@3"] == pytest.approx(1.0)
    assert m["warm"]["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    # the cut applies: at k=1 only the warm row with the target on top hits
    m1 = cold_warm_metrics(RECS, TARGETS, COLD, k=1)
    assert m1["cold"]["recall@1"] == 0 and m1["warm"]["recall@1"] == pytest.approx(0.5)
    # a group without rows measured nothing: None, not 0
    none = cold_warm_metrics(RECS[2:], TARGETS[2:], COLD, k=3)
    assert none["cold"] == {"targets": 0, "recall@3": None, "ndcg@3": None}
    with pytest.raises(ValueError):
        cold_warm_metrics(RECS, TARGETS[:2], COLD)
    assert cold_k([1, 3, 5, 10]) == 10 and cold_k([1, 5]) == 5 and cold_k([20, 50]) == 10


def _sids_dir(tmp_path, cold):
    extra = {"cold_ads": sorted(cold)} if cold is not None else {}
    write_manifest(str(tmp_path), "sids", inputs={}, config={}, counts={}, timings={},
                   extra=extra)
    return str(tmp_path)


def test_methods_get_cold_and_warm_entries_and_the_report_a_table(tmp_path):
    sids = _sids_dir(tmp_path / "on", COLD)
    assert load_cold_ads(sids) == COLD
    ranked = {"leadre-sft": RECS, "sasrec": [["a", "b", "x"]] * 4}
    methods = {name: {"hr@3": 0.0, "ndcg@3": 0.0} for name in ranked}
    assert add_cold_warm(methods, ranked, TARGETS, sids, ks=[1, 3]) == 3
    assert methods["leadre-sft"]["cold"]["recall@3"] == pytest.approx(0.5)
    assert methods["sasrec"]["cold"] == {"targets": 2, "recall@3": 0.0, "ndcg@3": 0.0}
    assert methods["sasrec"]["warm"]["recall@3"] == pytest.approx(1.0)
    report = markdown_report({"split": "test", "users": 4, "methods": methods}, [1, 3], 10)
    assert "## Cold and warm targets" in report
    assert "| method | cold (2 rows): recall@3 / ndcg@3 | warm (2 rows): recall@3 / ndcg@3 |" \
        in report
    assert "| sasrec | 0.0000 / 0.0000 | 1.0000 / 1.0000 |" in report
    assert "0 by construction" in report

    # without the split (an old manifest, or cold_fraction=0): nothing is added or reported
    for cold in (None, []):
        off = _sids_dir(tmp_path / f"off{cold}", cold)
        assert load_cold_ads(off) == frozenset()
        plain = {name: {"hr@3": 0.0} for name in ranked}
        assert add_cold_warm(plain, ranked, TARGETS, off, ks=[3]) == 0
        assert all("cold" not in m for m in plain.values())
        assert "Cold and warm" not in markdown_report({"methods": plain}, [3], 10)


# --- through `leadre eval` --------------------------------------------------------------------


def test_eval_stage_scores_cold_and_warm_targets(dirs, ray_local, tmp_path):
    """`leadre eval` on S-IDs whose manifest names cold ads: every method (the LLM and each
    baseline) gets its cold and warm entries, and report.md the table."""
    import json
    import shutil

    from leadre.artifacts import read_manifest
    from leadre.eval.config import EvalConfig
    from leadre.eval.evaluate import run
    from leadre.eval.rows import load_eval_rows
    from leadre.model.config import GenerationConfig

    root, table, *_ = dirs
    sids = tmp_path / "sids"
    shutil.copytree(root / "sids", sids)
    rows = load_eval_rows(str(root / "prompts"), "test")
    cold = sorted(set(rows.target_ad_id))[::3]
    m = read_manifest(sids)
    write_manifest(str(sids), "sids", inputs=m["inputs"], config=m["config"],
                   counts=m["counts"], timings={}, extra={"cold_ads": cold})
    out = tmp_path / "out"
    run(EvalConfig(prompts_dir=str(root / "prompts"), model_dir=str(root / "sft"),
                   sids_dir=str(sids), out=str(out), ci_resamples=0,
                   generation=GenerationConfig(beam_size=10, batch_size=16, num_replicas=1,
                                               device="cpu"),
                   baselines=["most_popular", "sasrec"], sasrec={"epochs": 2, "dim": 16}))
    metrics = json.loads((out / "metrics.json").read_text())
    n_cold = int(rows.target_ad_id.isin(cold).sum())
    assert set(metrics["methods"]) == {"leadre-sft", "most_popular", "sasrec"}
    for name, mm in metrics["methods"].items():
        assert mm["cold"]["targets"] == n_cold > 0, name
        assert mm["cold"]["targets"] + mm["warm"]["targets"] == metrics["rows"]
        for group in ("cold", "warm"):
            assert 0 <= mm[group]["recall@10"] <= 1 and 0 <= mm[group]["ndcg@10"] <= 1
    md = (out / "report.md").read_text()
    assert "## Cold and warm targets" in md and f"cold ({n_cold} rows)" in md
