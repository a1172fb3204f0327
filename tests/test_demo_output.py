"""What `leadre demo` shows on the terminal: the closing summary and the console that keeps
library output in per-stage log files (the full demo run is too slow for the default suite)."""

import os
import sys

from leadre.console import Console
from leadre.demo import metrics_table, render_summary

METRICS = {"rows": 300, "methods": {
    "popularity": {"hr@10": 0.05, "ndcg@10": 0.02, "coverage@10": 0.02},
    "leadre-dpo": {"hr@10": 0.1234, "ndcg@10": 0.0567, "coverage@10": 0.4},
    "sasrec": {"hr@10": 0.08, "ndcg@10": float("nan")},
}}


def _render(**kw):
    args = dict(metrics=METRICS, titles={"a1": "Trail running shoes", "a2": "Espresso machine"},
                answers={"u001": {"first_cache": "miss", "later_cache": "hit",
                                  "ads": ["a1", "a2", "a9"], "sources": ["llm", "llm", "ann"]}},
                root="/d", outputs=["world", "ingest", "eval"], eval_dir="/d/eval",
                model_dir="/d/dpo", logs="/d/logs", ray_logs="/d/logs/ray", seconds=420.0,
                serve_cmd="leadre serve --port 8123",
                curl_cmd="curl -s http://127.0.0.1:8123/recommend", plots=["comparison.png"])
    args.update(kw)
    return render_summary(**args)


def test_metrics_table_puts_leadre_first_with_hr_ndcg_coverage():
    lines = metrics_table(METRICS)
    assert lines[0].split() == ["method", "HR@10", "NDCG@10", "coverage@10"]
    assert lines[1].split() == ["leadre-dpo", "0.1234", "0.0567", "0.4000"]
    assert [line.split()[0] for line in lines[2:]] == ["popularity", "sasrec"]
    assert lines[3].split() == ["sasrec", "0.0800", "-", "-"]  # NaN and missing: a dash


def test_metrics_table_shows_fused_then_beam_then_baselines_with_cold_and_warm_recall():
    cold = {"targets": 12, "recall@10": 0.25, "ndcg@10": 0.1}
    metrics = {"rows": 100, "methods": {
        "leadre-dpo": {"hr@10": 0.4, "ndcg@10": 0.2, "cold": cold,
                       "warm": {"targets": 88, "recall@10": 0.42, "ndcg@10": 0.21}},
        "leadre-dpo-beam": {"hr@10": 0.38, "ndcg@10": 0.2,
                            "cold": {**cold, "recall@10": 0.0}, "warm": cold},
        "sasrec": {"hr@10": 0.36, "ndcg@10": 0.19, "cold": {**cold, "recall@10": 0.0},
                   "warm": cold}},
        "channel": {"k": 50, "rows": 100, "incremental_recall@100": 0.03,
                    "incremental_recall@100_ci": [0.01, 0.05]}}
    lines = metrics_table(metrics)
    assert lines[0].split()[-4:] == ["cold", "R@10", "warm", "R@10"]
    assert [line.split()[0] for line in lines[1:4]] == ["leadre-dpo", "leadre-dpo-beam",
                                                        "sasrec"]
    assert lines[1].split()[-2:] == ["0.2500", "0.4200"]
    assert "cold: 12 test users" in lines[4] and "0 by construction" in lines[4]
    assert lines[5] == ("  channel: SASRec top 50 + LEADRE top 50 vs SASRec top 100: "
                        "recall@100 +0.0300 [+0.0100, +0.0500]")


def test_summary_names_titles_artifacts_and_the_curl_line():
    text = _render()
    assert "Offline evaluation on 300 test users (/d/eval/metrics.json)" in text
    assert "1. Trail running shoes  [a1, llm]" in text and "2. Espresso machine" in text
    assert "3. ?  [a9, ann]" in text  # an ad missing from the ads table still shows its id
    assert "/d/eval/report.md" in text and "/d/eval/comparison.png" in text
    assert "/d/dpo/merged" in text and "/d/logs/<stage>.log; Ray workers: /d/logs/ray" in text
    assert "  curl -s http://127.0.0.1:8123/recommend" in text
    assert len(text.splitlines()) < 40


def test_summary_shows_each_users_interests_and_the_ads_categories():
    answers = {"u001": {"first_cache": "miss", "later_cache": "hit", "ads": ["a1", "a2"],
                        "sources": ["generated", "ann"], "interests": ["sports", "travel"]}}
    text = _render(answers=answers, categories={"a1": "sports"})
    assert "u001  interests: sports, travel  (first call: miss, later: hit)" in text
    assert "1. Trail running shoes  [sports, a1, generated]" in text
    assert "2. Espresso machine  [a2, ann]" in text


def test_demo_picks_users_with_different_main_interests():
    from leadre.demo import pick_users

    interests = {"u1": ["sports", "food"], "u2": ["sports"], "u3": [], "u4": ["food"],
                 "u5": ["travel", "sports"], "u6": ["cars"]}
    assert pick_users(interests, 3) == ["u1", "u4", "u5"]
    assert pick_users({"u1": ["a"], "u2": ["a"]}, 2) == ["u1", "u2"]  # fills up when it must


def test_summary_reports_a_failed_http_call():
    text = _render(answers={"error": "HTTP request failed: refused"})
    assert "HTTP request failed: refused" in text


def test_quiet_console_sends_library_output_to_the_log(tmp_path, capfd):
    console = Console(quiet=True)
    log = tmp_path / "stage.log"
    with console.stage_line("  [1/1] stage") as note, console.output_to(log):
        print("from print")
        os.write(2, b"from the C level\n")
        print("from stderr", file=sys.stderr)
        note("3 things done")
    out, err = capfd.readouterr()
    assert "from" not in out + err
    assert out.startswith("  [1/1] stage") and out.rstrip().endswith("3 things done")
    assert out.count("\n") == 1  # one line per stage
    assert log.read_text().splitlines() == ["from print", "from the C level", "from stderr"]
    print("after")  # the process's own streams are back
    assert capfd.readouterr().out == "after\n"


def test_a_handler_made_during_a_stage_still_works_after_it(tmp_path, capfd):
    import logging

    console = Console(quiet=True)
    with console.output_to(tmp_path / "a.log"):
        handler = logging.StreamHandler()  # binds the sys.stderr of that moment
    with console.output_to(tmp_path / "b.log"):
        handler.emit(logging.makeLogRecord({"msg": "later"}))
    assert "later" in (tmp_path / "b.log").read_text()
    assert "Logging error" not in capfd.readouterr().err


def test_metrics_table_shows_the_paired_difference_with_its_interval():
    metrics = {**METRICS, "differences": {"leadre-dpo - sasrec": {
        "hr@10": [0.0434, 0.012, 0.075], "ndcg@10": [0.01, -0.004, 0.024]}}}
    lines = metrics_table(metrics)
    assert ("  leadre-dpo - sasrec: HR@10 +0.0434 [+0.012, +0.075], NDCG@10 +0.0100 "
            "[-0.004, +0.024] (paired)") in lines
