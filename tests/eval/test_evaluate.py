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
from leadre.eval.evaluate import EvalConfig, generate_all, run, train_sequences
from leadre.sids.table import SidTable
from leadre.data.synth import SynthConfig, generate

QUESTION = " What ad will the user be interested in next time?"


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
    for split, cut in (("valid", 2), ("test", 1)):
        recs = []
        for u, s in seqs.items():
            hist, target = s[:-cut], s[-cut]
            prompt = "click on ad " + " ".join(table.sid(a) for a in hist[-20:]) + QUESTION
            recs.append({"user_id": u, "prompt": prompt, "target_ad_id": target,
                         "target_sid": table.sid(target), "history_ad_ids": hist[-20:]})
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
    return root, table


def test_eval_stage_end_to_end(dirs, ray_local):
    root, table = dirs
    out = root / "out"
    manifest = run(EvalConfig(
        prompts_dir=str(root / "prompts"), model_dir=str(root / "sft"), out=str(out),
        beam_size=10, batch_size=16, actors=1, device="cpu",
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
    md = (out / "report.md").read_text()
    assert "| leadre-sft |" in md and "hr@10" in md and "| sasrec |" in md
    for png in ("metric_vs_k.png", "comparison.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    recs = read_table(out, "recommendations").to_pandas()
    assert len(recs) == n_rows
    active = set(table.ad_id_array[table.active])
    assert all(len(r) == 10 and set(r) <= active for r in recs.rec_ad_ids)
    assert all(table.ad_ids(s) == list(r) for s, r in zip(recs.rec_sids, recs.rec_ad_ids))


def test_ray_and_local_generation_agree(dirs, ray_local):
    root, _ = dirs
    prompts = read_table(root / "prompts", "eval/test").column("prompt").to_pylist()[:40]
    base = dict(prompts_dir=str(root / "prompts"), beam_size=5, ks=[1, 5], batch_size=8,
                device="cpu")
    a = generate_all(EvalConfig(**base, generate_on="ray"), str(root / "sft"),
                     str(root / "sids"), prompts)
    b = generate_all(EvalConfig(**base, generate_on="local"), str(root / "sft"),
                     str(root / "sids"), prompts)
    assert a.rec_ad_ids.map(list).tolist() == b.rec_ad_ids.map(list).tolist()


def test_train_sequences_end_before_targets(dirs):
    root, _ = dirs
    seqs, valid = train_sequences(str(root / "prompts"))
    test = read_table(root / "prompts", "eval/test").to_pandas()
    assert len(seqs) == len(valid) == len(test)
    # Leave-one-out here: a training sequence never contains its user's valid or test target.
    by_user = dict(zip(valid.user_id, valid.history_ad_ids))
    for u, h, t in zip(test.user_id, test.history_ad_ids, test.target_ad_id):
        assert list(by_user[u]) == list(h)[:-1]


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="baseline"):
        EvalConfig(baselines=["bm25"])
    with pytest.raises(ConfigError, match="beam_size"):
        EvalConfig(ks=[1, 50])
    with pytest.raises(ConfigError, match="SASRec"):
        EvalConfig(sasrec={"dims": 3})


def test_ablation_plan(tmp_path):
    from leadre.eval.ablation import AblationConfig, markdown, plan, run as run_ablation

    cfg = AblationConfig(ingest_dir="runs/ingest", sids_dir="runs/sids", out=str(tmp_path),
                         sft={"preset": "tiny", "max_steps": 5}, dry_run=True)
    steps, rows = plan(cfg)
    names = [s.name for s in steps]
    assert names == ["prompts_ad", "prompts_xd", "sft_main_only", "sft_aux", "sft_cross_domain",
                     "dpo", "eval_main_only", "eval_aux", "eval_cross_domain", "eval_dpo"]
    by = {s.name: s.config for s in steps}
    assert not {"play", "read"} & set(by["prompts_ad"].history_actions)
    assert {"play", "read"} <= set(by["prompts_xd"].history_actions)
    assert by["sft_main_only"].tasks == ["main"] and by["sft_aux"].tasks is None
    assert by["sft_aux"].prompts_dir == by["prompts_ad"].out
    assert by["dpo"].sft_dir == by["sft_cross_domain"].out
    assert by["eval_dpo"].model_dir == by["dpo"].out and by["eval_dpo"].baselines
    assert by["eval_aux"].baselines == [] and by["sft_aux"].preset == "tiny"
    assert set(rows) == {"main_only", "aux", "cross_domain", "dpo"}
    assert run_ablation(cfg)["summary"]["dry_run"] is True
    md = markdown({"main_only": {"hr@10": 0.1, "ecpm@10": 2.0},
                   "aux": {"hr@10": 0.12, "ecpm@10": 2.0}}, {"sasrec": {"hr@10": 0.2}})
    assert "+20.0%" in md and "| sasrec |" in md
