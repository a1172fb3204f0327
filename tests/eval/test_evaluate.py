"""`leadre eval` end to end on small artifact directories built from the synthetic world:
Ray Data generation, zero invalid outputs, baselines on the same rows, JSON/Markdown/PNG."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from _tiny_lm import tiny_model, tiny_tokenizer
from leadre.artifacts import read_manifest, read_table, write_manifest, write_table
from leadre.config import ConfigError
from leadre.eval.config import EvalConfig
from leadre.eval.evaluate import generate_all, run, run_baselines
from leadre.model.config import GenerationConfig
from leadre.eval.rows import (early_stopping_slice, kept_after_history, load_eval_rows,
                              sample_users, train_sequences, user_set_hash)
from leadre.sids.table import SidTable
from leadre.data.config import SynthConfig
from leadre.data.synth import generate

QUESTION = " What ad will the user be interested in next time?"
WINDOW = 5  # the prompts' max_events here: shorter than most sequences


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    w = generate(SynthConfig(users=120, ads=60, seed=0, mean_events=50))
    ads = w.ads.to_pandas()
    write_table(w.ads, root / "ingest", "ads")
    write_manifest(root / "ingest", "ingest", inputs={}, config={}, counts={}, timings={})

    rng = np.random.default_rng(0)
    codes = np.stack([w.ad_category % 8, rng.integers(0, 4, len(ads))], axis=1)
    table = SidTable.from_codes(ads.ad_id.tolist(), codes, [8, 4], ads.active.tolist(),
                                version="v1")
    table.save(str(root / "sids"))
    emb = np.eye(len(w.categories))[w.ad_category] + 0.3 * rng.normal(size=(len(ads), len(w.categories)))
    write_table(pa.table({"ad_id": ads.ad_id.tolist(), "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(emb.ravel(), pa.float32()), emb.shape[1])}), root / "sids", "embeddings")
    write_manifest(root / "sids", "sids", inputs={}, config={}, counts={}, timings={})

    ev = w.events.to_pandas()
    clicks = ev[ev.action == "click"].sort_values(["user_id", "ts"])
    seqs = {u: s for u, s in clicks.groupby("user_id").ad_id.apply(list).items() if len(s) >= 3}
    # Leave-one-out rows as `leadre prompts` writes them: the prompt sees the last WINDOW
    # items (history_ad_ids), sequence_ad_ids holds them all. Every fifth user has training
    # targets only (a train row, no valid or test row).
    train_only = set(sorted(seqs)[::5])
    for split, cut in (("train", 3), ("valid", 2), ("test", 1)):
        recs = []
        for u, s in seqs.items():
            if u in train_only and split != "train":
                continue
            c = 1 if u in train_only else cut
            hist, target = s[:-c], s[-c]
            prompt = "click on ad " + " ".join(table.sid(a) for a in hist[-WINDOW:]) + QUESTION
            recs.append({"user_id": u, "prompt": prompt, "target_ad_id": target,
                         "target_sid": table.sid(target), "history_ad_ids": hist[-WINDOW:],
                         "sequence_ad_ids": hist})
        write_table(pa.Table.from_pylist(recs), root / "prompts", f"eval/{split}")
    write_manifest(root / "prompts", "prompts",
                   inputs={"ingest_dir": str(root / "ingest"), "sids_dir": str(root / "sids")},
                   config={}, counts={}, timings={}, extra={"sid_version": "v1"})

    tok = tiny_tokenizer(table.tokens())
    model = tiny_model(len(tok), seed=0)
    for sub in ("model", "merged"):
        model.save_pretrained(root / "sft" / sub)
        tok.save_pretrained(root / "sft" / sub)
    write_manifest(root / "sft", "sft", inputs={}, config={}, counts={}, timings={})
    return root, table, seqs, train_only


def test_eval_stage_end_to_end(dirs, ray_local):
    root, table, *_ = dirs
    out = root / "out"
    manifest = run(EvalConfig(
        prompts_dir=str(root / "prompts"), model_dir=str(root / "sft"), out=str(out),
        generation=GenerationConfig(beam_size=10, batch_size=16, num_replicas=1, device="cpu"),
        baselines=["most_popular", "sasrec", "embedding_ann", "random"],
        sasrec={"epochs": 3, "dim": 16}))
    assert manifest["stage"] == "eval" == read_manifest(out, "eval")["stage"]
    report = json.loads((out / "metrics.json").read_text())
    methods = report["methods"]
    assert set(methods) == {"leadre-sft", "most_popular", "sasrec", "embedding_ann", "random"}
    n_rows = report["rows"]
    assert n_rows > 50
    gen = report["generation"]["leadre-sft"]
    assert gen["invalid_rate"] == 0.0 and gen["generated"] == 10 * n_rows
    for name, m in methods.items():
        for k in (1, 3, 5, 10):
            assert 0 <= m[f"hr@{k}"] <= 1 and 0 <= m[f"ndcg@{k}"] <= m[f"hr@{k}"] + 1e-9
        assert m["hr@1"] <= m["hr@3"] <= m["hr@5"] <= m["hr@10"]
        assert "ecpm@10" in m and "diversity@10" in m and "novelty@10" in m
        for c in ("hr@10", "ndcg@10", "hr@1"):  # a 95% bootstrap interval next to each
            lo, hi = m[f"{c}_ci"]
            assert 0 <= lo <= m[c] <= hi <= 1
    assert report["users"] == n_rows and report["filter_history"] is False
    assert report["ci"]["resamples"] == 1000 and report["ci"]["level"] == 0.95
    assert report["early_stopping"] == {"slice": "valid_rows", "rows": n_rows}
    summary = manifest["summary"]
    assert summary["users_hash"] == report["users_hash"] and summary["filter_history"] is False
    assert summary["sasrec"]["hr@10_ci"] == [round(x, 4) for x in methods["sasrec"]["hr@10_ci"]]
    md = (out / "report.md").read_text()
    assert "| leadre-sft |" in md and "hr@10" in md and "| sasrec |" in md
    assert "history items not filtered" in md and report["users_hash"] in md
    lo, hi = methods["sasrec"]["hr@10_ci"]
    assert f"{methods['sasrec']['hr@10']:.4f} [{lo:.3f}, {hi:.3f}]" in md
    for png in ("metric_vs_k.png", "comparison.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    recs = read_table(out, "recommendations").to_pandas()
    assert len(recs) == n_rows
    active = set(table.ad_id_array[table.active])
    assert all(len(r) == 10 and set(r) <= active for r in recs.rec_ad_ids)
    assert all(table.ad_ids(s) == list(r) for s, r in zip(recs.rec_sids, recs.rec_ad_ids))
    # every method is also scored by ad-history length, and the groups add up
    for m in methods.values():
        g = m["groups"]
        assert g["ad_history<=3"]["rows"] + g["ad_history>3"]["rows"] == n_rows
    assert "## By ad-history length" in md


def test_eval_channel_report_merges_leadre_into_sasrec(dirs, ray_local):
    root, *_ = dirs
    out = root / "out_channel"
    run(EvalConfig(prompts_dir=str(root / "prompts"), model_dir=str(root / "sft"), out=str(out),
                   generation=GenerationConfig(beam_size=8, batch_size=16, device="cpu"),
                   ks=[1, 5], generate_on="local",
                   baselines=["sasrec"], sasrec={"epochs": 2, "dim": 16}, channel_k=8,
                   ci_resamples=0))
    report = json.loads((out / "metrics.json").read_text())
    ch = report["channel"]
    assert ch["k"] == 8 and ch["rows"] == report["rows"]
    sas, ours, both = ch["sasrec"], ch["leadre"], ch["sasrec@8+leadre@8"]
    assert sas["recall@8"] <= sas["recall@16"] and set(ours) >= {"recall@8", "coverage@8"}
    assert ch["incremental_recall@16"] == pytest.approx(both["recall@16"] - sas["recall@16"])
    # the metrics at K still use the top-K only, not the longer channel lists
    assert 0 <= report["methods"]["sasrec"]["hr@5"] <= sas["recall@8"] + 1e-9
    assert "## As a retrieval channel" in (out / "report.md").read_text()


def test_valid_split_with_filtered_history(dirs):
    """split=valid + filter_history: the LLM decodes all beams and drops the history's ads,
    SASRec early-stops on its held-out last items, and every report says so."""
    root, table, *_ = dirs
    out = root / "out_valid"
    manifest = run(EvalConfig(
        prompts_dir=str(root / "prompts"), model_dir=str(root / "sft"), out=str(out),
        split="valid", filter_history=True,
        generation=GenerationConfig(beam_size=20, batch_size=16, device="cpu"),
        generate_on="local", max_rows=40, baselines=["sasrec"],
        sasrec={"epochs": 2, "dim": 16}))
    report = json.loads((out / "metrics.json").read_text())
    assert report["split"] == "valid" and report["filter_history"] is True
    assert report["early_stopping"]["slice"] == "train_last_item"
    assert manifest["summary"]["filter_history"] is True and manifest["summary"]["users"] == 40
    assert "history items filtered from every ranking" in (out / "report.md").read_text()
    assert "train_last_item" in (out / "report.md").read_text()
    assert report["generation"]["leadre-sft"]["generated"] == 20 * 40
    rows = load_eval_rows(str(root / "prompts"), "valid").set_index("user_id")
    recs = read_table(out, "recommendations").to_pandas()
    assert len(recs) == 40 and all(len(r) <= 10 for r in recs.rec_ad_ids)
    for u, r, sids in zip(recs.user_id, recs.rec_ad_ids, recs.rec_sids):
        assert not set(r) & set(rows.sequence_ad_ids[u])
        assert table.ad_ids(sids) == list(r)


def test_ray_and_local_generation_agree_even_with_an_actor_on_every_cpu(dirs, ray_local):
    """Ray generation gives the plain loop's output, also when the actor pool holds every CPU
    of the cluster (here 2 of 2, like `ray.num_cpus=1` with the default actor): nothing in the
    pipeline may wait for a free CPU (a repartition used to, forever)."""
    root, *_ = dirs
    prompts = read_table(root / "prompts", "eval/test").column("prompt").to_pylist()[:40]
    gen = dict(beam_size=5, batch_size=8, device="cpu")
    base = dict(prompts_dir=str(root / "prompts"), ks=[1, 5])
    a = generate_all(EvalConfig(**base, generate_on="ray",
                                generation=GenerationConfig(**gen, num_cpus=2.0)),
                     str(root / "sft"), str(root / "sids"), prompts)
    b = generate_all(EvalConfig(**base, generate_on="local",
                                generation=GenerationConfig(**gen)), str(root / "sft"),
                     str(root / "sids"), prompts)
    assert a.rec_ad_ids.map(list).tolist() == b.rec_ad_ids.map(list).tolist()


def test_train_sequences_are_full_and_cover_train_only_users(dirs):
    """Baselines train on each user's whole sequence before its first evaluation target,
    not on the prompt's window, and users with training targets only contribute too."""
    root, _, seqs, train_only = dirs
    train, valid = train_sequences(str(root / "prompts"))
    assert set(train) == set(seqs) and train_only <= set(train)
    for u, s in seqs.items():
        # leave-one-out: everything before the valid target; train-only: the whole sequence
        assert train[u] == (list(s) if u in train_only else list(s[:-2])), u
    assert max(map(len, train.values())) > WINDOW  # longer than any history_ad_ids
    assert set(valid.user_id) == set(seqs) - train_only
    assert valid.user_id.is_monotonic_increasing  # user-id order, whatever the shards


def test_sample_picks_the_same_users_in_every_directory(dirs, tmp_path):
    """A max_rows sample depends on the user ids only: a prompt directory with other prompts
    and another shard order (an ablation variant) is scored on the same users, and the
    report says which (count + hash)."""
    root, *_ = dirs
    test = read_table(root / "prompts", "eval/test")
    other = tmp_path / "prompts_variant"
    flipped = test.take(np.arange(test.num_rows)[::-1])
    flipped = flipped.set_column(1, "prompt", pa.array(
        ["variant " + p for p in flipped.column("prompt").to_pylist()]))
    half = flipped.num_rows // 2
    write_table(flipped.slice(0, half), other, "eval/test/a")
    write_table(flipped.slice(half), other, "eval/test/b")
    for split in ("train", "valid"):
        write_table(read_table(root / "prompts", f"eval/{split}"), other, f"eval/{split}")
    write_manifest(other, "prompts", inputs=read_manifest(root / "prompts")["inputs"],
                   config={}, counts={}, timings={}, extra={"sid_version": "v1"})
    # What the old sampling did (pandas .sample on the rows in shard order) picks other users:
    old = [set(t.to_pandas().sample(30, random_state=0).user_id) for t in (test, flipped)]
    assert old[0] != old[1]
    reports = []
    for d in (root / "prompts", other):
        out = tmp_path / f"eval_{d.name}"
        manifest = run(EvalConfig(prompts_dir=str(d), model_dir=None, out=str(out), max_rows=30,
                                  baselines=["most_popular"], ci_resamples=50))
        reports.append((json.loads((out / "metrics.json").read_text()), manifest["summary"]))
    (a, sa), (b, sb) = reports
    assert a["users"] == b["users"] == a["rows"] == 30
    assert a["users_hash"] == b["users_hash"] == sa["users_hash"] == sb["users_hash"]
    assert len(a["users_hash"]) == 12 and sa["users"] == 30
    assert a["methods"]["most_popular"]["hr@10"] == b["methods"]["most_popular"]["hr@10"]
    assert a["methods"]["most_popular"]["hr@10_ci"] == b["methods"]["most_popular"]["hr@10_ci"]
    picked = sample_users(test.column("user_id").to_pylist(), 30, 0)
    assert user_set_hash(np.array(test.column("user_id").to_pylist())[picked]) == a["users_hash"]
    assert sample_users(["u1", "u2"], 1, 0).sum() == 1 and sample_users(["u1"], None, 0).all()


def test_early_stopping_never_uses_the_scored_rows(dirs):
    """split=valid: SASRec early-stops on the last item of each training sequence (held out
    of its training), not on the valid rows; split=test: on the valid rows."""
    root, _, seqs, train_only = dirs
    train, valid = train_sequences(str(root / "prompts"))
    fit, (hist, targets), info = early_stopping_slice("valid", train, valid, seed=0)
    assert info == {"slice": "train_last_item", "rows": len(targets)} and len(targets) > 50
    assert fit == [s[:-1] for s in train.values()]
    held = {(tuple(s[:-1]), s[-1]) for s in train.values()}
    assert {(tuple(h), t) for h, t in zip(hist, targets)} <= held
    scored = set(zip(valid.sequence_ad_ids.map(tuple), valid.target_ad_id))
    assert not scored & set(zip(map(tuple, hist), targets))
    fit, (hist, targets), info = early_stopping_slice("test", train, valid, seed=0)
    assert info == {"slice": "valid_rows", "rows": len(valid)}
    assert fit == list(train.values()) and targets == valid.target_ad_id.tolist()
    _, stop, _ = early_stopping_slice("test", train, valid, seed=0, n=10)
    assert len(stop[1]) == 10


def test_filter_history_for_every_baseline(dirs):
    """filter_history drops each row's earlier ads from every baseline's top K (and still
    returns K ads); without it, repeat ads are recommended."""
    from leadre.sids.build import load_table

    root, *_ = dirs
    table = load_table(str(root / "sids"))
    rows = load_eval_rows(str(root / "prompts"), "test")
    train, valid = train_sequences(str(root / "prompts"))
    names = ["most_popular", "embedding_ann", "random"]
    seen = [set(h) for h in rows.sequence_ad_ids]
    for flag in (False, True):
        cfg = EvalConfig(prompts_dir=str(root / "prompts"), baselines=names, filter_history=flag)
        recs, _ = run_baselines(cfg, rows, table, str(root / "sids"), train, valid, 10, {})
        overlap = {n: sum(len(set(r) & h) for r, h in zip(recs[n], seen)) for n in names}
        assert all(len(r) == 10 for n in names for r in recs[n])
        if flag:
            assert overlap == {n: 0 for n in names}
        else:
            assert overlap["most_popular"] > 0 and overlap["embedding_ann"] > 0
    assert kept_after_history([["a", "b", "c", "d"]], [["b"]], 2) == [[0, 2]]


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="baseline"):
        EvalConfig(baselines=["bm25"])
    with pytest.raises(ConfigError, match="beam_size"):
        EvalConfig(ks=[1, 50])
    with pytest.raises(ConfigError, match="SASRec"):
        EvalConfig(sasrec={"dims": 3})
    with pytest.raises(ConfigError, match="ci_resamples"):
        EvalConfig(ci_resamples=-1)
    beam20 = GenerationConfig(beam_size=20)
    assert EvalConfig(filter_history=True, generation=beam20).generation.top_k == 20
    assert EvalConfig(generation=GenerationConfig(beam_size=20)).generation.top_k == 10


def test_ablation_plan(tmp_path):
    from leadre.eval.ablation import markdown, plan, run as run_ablation
    from leadre.eval.config import AblationConfig

    cfg = AblationConfig(ingest_dir="runs/ingest", sids_dir="runs/sids", out=str(tmp_path),
                         sft={"preset": "tiny", "max_steps": 5}, seeds=[0], dry_run=True)
    steps, rows = plan(cfg)
    names = [s.name for s in steps]
    assert names == ["prompts_ad", "prompts_xd", "prompts_kn", "sft_main_only_s0",
                     "sft_aux_s0", "sft_cross_domain_s0", "sft_knowledge_s0", "dpo_s0",
                     "eval_main_only_s0", "eval_aux_s0", "eval_cross_domain_s0",
                     "eval_knowledge_s0", "eval_dpo_s0"]
    by = {s.name: s.config for s in steps}
    assert not {"play", "read"} & set(by["prompts_ad"].history_actions)
    assert {"play", "read"} <= set(by["prompts_xd"].history_actions)
    assert by["prompts_xd"].content_object == "title"
    assert by["prompts_kn"].content_object == "code"
    assert by["sft_main_only_s0"].tasks == ["main"] and by["sft_aux_s0"].tasks is None
    assert by["sft_aux_s0"].prompts_dir == by["prompts_ad"].out
    assert by["sft_cross_domain_s0"].sid_init == "mean"
    assert by["sft_knowledge_s0"].sid_init == "codebook"
    assert by["sft_knowledge_s0"].prompts_dir == by["prompts_kn"].out
    # equal budget: every SFT variant trains the same optimizer steps
    assert {by[n].max_steps for n in names if n.startswith("sft_")} == {5}
    assert by["dpo_s0"].sft_dir == by["sft_knowledge_s0"].out
    assert by["eval_dpo_s0"].model_dir == by["dpo_s0"].out and by["eval_dpo_s0"].baselines
    assert by["eval_aux_s0"].baselines == [] and by["sft_aux_s0"].preset == "tiny"
    assert set(rows) == {"main_only", "aux", "cross_domain", "knowledge", "dpo"}
    assert run_ablation(cfg)["summary"]["dry_run"] is True
    md = markdown({"main_only": {"hr@10": (0.1, 0.01), "ecpm@10": (2.0, 0.0)},
                   "aux": {"hr@10": (0.12, 0.02), "ecpm@10": (2.0, 0.0)}},
                  {"sasrec": {"hr@10": 0.2}})
    assert "+20.0%" in md and "| sasrec |" in md and "0.1200 ± 0.0200" in md
    with pytest.raises(ConfigError, match="same number of optimizer steps"):
        plan(AblationConfig(ingest_dir="runs/ingest", sids_dir="runs/sids", out=str(tmp_path),
                            sft={"preset": "tiny", "epochs": 1}, dry_run=True))


def test_ablation_table_gives_a_95_percent_interval_over_seeds():
    from leadre.eval.ablation import _mean_ci

    mean, half = _mean_ci([0.30, 0.32, 0.34])
    assert mean == pytest.approx(0.32)
    assert half == pytest.approx(4.303 * 0.02 / 3 ** 0.5)  # t(0.975, 2 df) * sd / sqrt(n)
    assert _mean_ci([0.3]) == (0.3, 0.0)


def test_ablation_plan_with_seeds_and_a_dpo_sweep(tmp_path):
    from leadre.eval.ablation import pick_operating_point, plan
    from leadre.eval.config import AblationConfig

    cfg = AblationConfig(ingest_dir="runs/ingest", sids_dir="runs/sids", out=str(tmp_path),
                         seeds=[0, 1], variants=["cross_domain", "dpo"],
                         sft={"max_steps": 5},
                         dpo_grid=[{"beta": 0.1, "max_steps": 20}, {"beta": 0.5}], dry_run=True)
    steps, rows = plan(cfg)
    by = {s.name: s for s in steps}
    assert rows["dpo"] == {0: by["eval_dpo_s0"].out, 1: by["eval_dpo_s1"].out}
    assert by["sft_cross_domain_s1"].config.seed == 1 and by["dpo_s1"].config.seed == 1
    # the sweep starts from the first seed's SFT model and is scored on valid only
    assert by["dpo_sweep0"].config.sft_dir == by["sft_cross_domain_s0"].out
    assert by["dpo_sweep0"].config.beta == 0.1 and by["dpo_sweep0"].config.max_steps == 20
    assert by["dpo_sweep1"].config.beta == 0.5
    assert by["eval_sweep1_valid"].config.split == "valid"
    assert by["eval_sweep1_valid"].config.model_dir == by["dpo_sweep1"].out
    assert by["eval_dpo_base_valid"].config.split == "valid"
    assert not any(s.config.split == "valid" for n, s in by.items() if n.endswith(("_s0", "_s1"))
                   and n.startswith("eval_"))
    sft = {"hr@10": 0.30, "ecpm@10": 4.0}
    points = [{"hr@10": 0.29, "ecpm@10": 4.1}, {"hr@10": 0.286, "ecpm@10": 4.3},
              {"hr@10": 0.20, "ecpm@10": 6.0}]
    assert pick_operating_point(sft, points, 0.05) == 1  # 0.20 loses too much HR
    assert pick_operating_point(sft, points[2:], 0.05) is None
    with pytest.raises(ConfigError, match="seeds"):
        AblationConfig(seeds=[])
