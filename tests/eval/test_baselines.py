"""Baselines train on a small synthetic world and beat random recommendations."""

from __future__ import annotations

import numpy as np
import pytest

from leadre.eval.baselines import (EmbeddingANN, MostPopular, RandomRec, SASRec, SasrecConfig,
                              tune_sasrec)
from leadre.eval.metrics import ranking_metrics
from leadre.sids.ann import AnnConfig
from leadre.data.config import SynthConfig
from leadre.data.synth import generate


@pytest.fixture(scope="module")
def world():
    w = generate(SynthConfig(users=800, ads=300, seed=0, mean_events=60))
    ev = w.events.to_pandas()
    clicks = ev[ev.action == "click"].sort_values(["user_id", "ts"])
    seqs = [s for s in clicks.groupby("user_id").ad_id.apply(list) if len(s) >= 4]
    ads = w.ads.to_pandas()
    active = ads.loc[ads.active, "ad_id"].tolist()
    # Leave-one-out over the sequences (last = test, second-to-last = valid).
    train = [s[:-2] for s in seqs]
    valid = ([s[:-2] for s in seqs], [s[-2] for s in seqs])
    test = ([s[:-1] for s in seqs], [s[-1] for s in seqs])
    rng = np.random.default_rng(0)
    emb = np.eye(len(w.categories))[w.ad_category] + 0.3 * rng.normal(size=(len(ads), len(w.categories)))
    return dict(ads=ads, active=active, train=train, valid=valid, test=test,
                emb=(ads.ad_id.tolist(), emb))


def hr10(recs, targets):
    return ranking_metrics(recs, targets, ks=(10,))["hr@10"]


def test_baselines_beat_random(world):
    hist, tgt = world["test"]
    rand = hr10(RandomRec(world["active"]).recommend(hist, 10), tgt)
    pop = MostPopular(world["active"]).fit(world["train"])
    sas = SASRec(world["ads"].ad_id.tolist(), world["active"],
                 SasrecConfig(dim=32, epochs=30, patience=4)).fit(world["train"],
                                                                 valid=world["valid"])
    ann = EmbeddingANN(world["emb"], world["active"]).fit(world["train"])
    scores = {m.name: hr10(m.recommend(hist, 10), tgt) for m in (pop, sas, ann)}
    for name, s in scores.items():
        assert s > 1.5 * rand, (name, s, rand)
    assert sas.history[0]["loss"] > sas.history[-1]["loss"]
    assert len(sas.history) < 30 or sas.best_valid_ndcg10 > 0  # early stopping ran


def test_recommend_only_active_ads(world):
    hist, _ = world["test"]
    active = set(world["active"])
    for model in (MostPopular(world["active"]).fit(world["train"]),
                  EmbeddingANN(world["emb"], world["active"]).fit(world["train"])):
        recs = model.recommend(hist[:50] + [[]], 10)
        assert all(len(r) == 10 and set(r) <= active for r in recs)
        assert len(set(recs[0])) == 10


def test_scann_path_agrees_with_exact(world):
    """Below ScaNN's brute-force size the baseline searches exactly; a forced ScaNN mode builds
    the index stage's searcher, tuned to the index config's recall target."""
    hist, _ = world["test"]
    exact = EmbeddingANN(world["emb"], world["active"]).fit(world["train"])
    ann = EmbeddingANN(world["emb"], world["active"], AnnConfig(mode="ah")).fit(world["train"])
    assert ann.searcher is not None and exact.searcher is None
    assert ann.query_params.get("pre_reorder_num_neighbors", 0) >= 10
    a, b = exact.recommend(hist[:100], 10), ann.recommend(hist[:100], 10)
    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)])
    assert overlap > 0.8


def test_tune_sasrec_keeps_best(world):
    best, records = tune_sasrec(world["ads"].ad_id.tolist(), world["active"], world["train"],
                                world["valid"], [{"dim": 16}, {"dim": 32}],
                                SasrecConfig(epochs=3, patience=2))
    assert len(records) == 2
    assert best.best_valid_ndcg10 == max(r["valid_ndcg@10"] for r in records)


def test_registry_builds_every_baseline(world, tmp_path):
    """Every registered name builds a baseline from the shared inputs; the two that read the
    S-ID stage's vectors (embedding_ann, text_sasrec) are skipped, with the reason recorded,
    when the S-ID directory has none."""
    from leadre.eval.baselines import BASELINES, BaselineInputs, Recommender

    assert list(BASELINES) == ["most_popular", "sasrec", "text_sasrec", "embedding_ann",
                               "random"]
    hist, _ = world["test"]
    x = BaselineInputs(item_ids=world["ads"].ad_id.tolist(), active_ids=world["active"],
                       sequences=world["train"], sids_dir=str(tmp_path), valid=world["valid"],
                       sasrec=SasrecConfig(dim=16, epochs=2))
    for name, factory in BASELINES.items():
        model, facts = factory(x)
        if name in ("embedding_ann", "text_sasrec"):
            assert model is None and "no embeddings" in facts["skipped"]
            continue
        assert isinstance(model, Recommender) and model.name == name
        assert set(model.recommend(hist[:5], 10)[0]) <= set(world["active"])
        assert (name == "sasrec") == bool(facts)


def test_text_aware_sasrec_learns_from_the_item_vectors(world):
    """The text-aware SASRec's items carry a trained projection of frozen vectors (here:
    category-revealing ones) next to their ID embedding; with little training it beats the
    ID-only model, which must learn every item from its few interactions."""
    hist, tgt = world["test"]
    cfg = SasrecConfig(dim=32, epochs=3, patience=3)
    ids = world["ads"].ad_id.tolist()
    plain = SASRec(ids, world["active"], cfg).fit(world["train"], valid=world["valid"])
    text = SASRec(ids, world["active"], cfg, text=world["emb"]).fit(world["train"],
                                                                    valid=world["valid"])
    assert text.name == "text_sasrec" and plain.name == "sasrec"
    assert text.net.proj is not None and text.net.text.shape == (len(ids) + 1,
                                                                 world["emb"][1].shape[1])
    assert not text.net.text[0].any()  # padding has no vector
    h_plain, h_text = hr10(plain.recommend(hist, 10), tgt), hr10(text.recommend(hist, 10), tgt)
    print(f"[text_sasrec] HR@10 after 3 epochs: ID-only {h_plain:.3f}, text-aware {h_text:.3f}")
    assert h_text > h_plain
