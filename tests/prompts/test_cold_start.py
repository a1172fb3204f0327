"""The cold-start split (issue 24, item 4) through the real stages: ingest marks the cold ads,
the S-ID stage fits its quantiser on the warm ones and records the cold set, the prompts stage
keeps cold ads out of every training interaction, so they appear only as test targets.

One small synthetic world (200 users, 100 ads) goes through ingest (cold_fraction=0.1), the
S-ID stage (LSA + RQ-KMeans) and the prompts stage on Ray Data once per module."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from leadre import artifacts
from leadre.config import ConfigError
from leadre.data.config import IngestConfig, SynthConfig
from leadre.data.ingest import mark_cold
from leadre.data.ingest import run as ingest_run
from leadre.data.synth import run as synth_run
from leadre.prompts import PromptConfig, build_local, read_split, run
from leadre.prompts.batch import build_shard
from leadre.prompts.pipeline import load_catalog, make_plan
from leadre.runtime import RayConfig
from leadre.sids import SidConfig, SidTable, load_trie
from leadre.sids import run as sids_run
from leadre.sids.build import load_cold_ads, make_quantizer
from leadre.sids.quantize import load_quantizer

from test_prompts import canon  # the same row-order-free comparison as the prompts tests

RAY = RayConfig(num_cpus=2, object_store_mb=300)
VALID_START, TEST_START = "2025-02-16", "2025-02-23"


def _sid_cfg(ingest: str, out: str) -> SidConfig:
    return SidConfig(ingest_dir=ingest, out=out, encoder="lsa", quantizer="rqkmeans",
                     embed_on="local", embed_dim=16)


def _prompt_cfg(w: dict, out: str, **kw) -> PromptConfig:
    base = dict(ingest_dir=w["ingest"], sids_dir=w["sids"], out=out, valid_start=VALID_START,
                test_start=TEST_START, ray=RAY, dpo_share=0.5)
    return PromptConfig(**{**base, **kw})


def _tables(out: str) -> dict[str, pd.DataFrame]:
    return {f"{kind}/{split}": read_split(out, kind, split).to_pandas()
            for kind in ("sft", "dpo", "eval") for split in ("train", "valid", "test")}


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cold")
    synth_run(SynthConfig(out=str(tmp / "world"), users=200, ads=100, seed=3))
    w = {"tmp": tmp, "ingest": str(tmp / "ingest"), "sids": str(tmp / "sids")}
    w["ingest_manifest"] = ingest_run(IngestConfig(
        input_dir=str(tmp / "world"), out=w["ingest"], ray=RAY, batch_size=2500,
        cold_fraction=0.1, cold_seed=7))
    w["sids_manifest"] = sids_run(_sid_cfg(w["ingest"], w["sids"]))
    w["ads"] = artifacts.read_table(w["ingest"], "ads").to_pandas()
    w["cold"] = set(w["ads"].ad_id[w["ads"].cold])
    w["table"] = SidTable.load(w["sids"])
    w["cold_sids"] = {w["table"].sid(a) for a in w["cold"]}
    w["manifest"] = run(_prompt_cfg(w, str(tmp / "prompts")))
    w["t"] = _tables(str(tmp / "prompts"))
    return w


def test_ingest_marks_a_tenth_of_the_active_ads_cold(world):
    ads = world["ads"]
    n_active = int(ads.active.sum())
    assert len(world["cold"]) == round(0.1 * n_active) > 0
    assert ads[ads.cold].active.all()  # an inactive ad is never a target, so never cold
    split = world["ingest_manifest"]["cold_split"]
    assert split == {"fraction": 0.1, "seed": 7, "ads": len(world["cold"]),
                     "active_ads": n_active}
    # deterministic in (seed, ad_id): row order does not matter, another seed picks others
    t = pa.Table.from_pandas(ads.drop(columns="cold"), preserve_index=False)
    again = mark_cold(t.take(np.arange(t.num_rows)[::-1]), 0.1, 7).to_pandas()
    assert set(again.ad_id[again.cold]) == world["cold"]
    other = mark_cold(t, 0.1, 8).to_pandas()
    assert set(other.ad_id[other.cold]) != world["cold"]
    # fraction 0 marks nothing (and ingest, with the split off, writes no column at all)
    off = mark_cold(t, 0.0, 7)
    assert off.column_names[-1] == "cold" and not any(off.column("cold").to_pylist())
    with pytest.raises(ConfigError, match="cold_fraction"):
        IngestConfig(cold_fraction=0.6)


def test_quantiser_is_fitted_on_the_warm_ads_and_cold_ads_get_unique_sids(world):
    m, table = world["sids_manifest"], world["table"]
    n = len(world["ads"])
    assert load_cold_ads(world["sids"]) == frozenset(world["cold"])
    assert m["cold_ads"] == sorted(world["cold"]) and m["counts"]["cold_ads"] == len(world["cold"])
    assert m["cold_split"]["quantizer_fit_ads"] == n - len(world["cold"])
    # the saved codebooks are what fitting on the warm vectors gives, not on all of them
    emb = artifacts.read_table(world["sids"], "embeddings").to_pandas().set_index("ad_id")
    vecs = np.stack(emb.embedding.map(np.asarray).to_numpy()).astype(np.float32)
    warm = ~emb.index.isin(list(world["cold"]))
    cfg = _sid_cfg(world["ingest"], world["sids"])
    saved = load_quantizer(world["sids"], device="cpu").fingerprint()
    assert make_quantizer(cfg, n).fit(vecs[warm]).fingerprint() == saved
    assert make_quantizer(cfg, n).fit(vecs).fingerprint() != saved
    # every cold ad has a valid, unique S-ID and is reachable through the trie
    sids = table.sids(table.ad_id_array)
    assert len(set(sids)) == len(sids) == n
    assert all(table.ad_id(table.sid(a)) == a for a in world["cold"])
    trie = load_trie(world["sids"])
    offsets = np.cumsum([0, *table.codebook_sizes[:-1]])
    for row in table.rows_of(sorted(world["cold"])):
        node = trie.node_of((table.codes[row] + offsets).tolist())
        assert trie.rows(np.array([node]))[0] == row
    assert world["sids_manifest"]["summary"]["cold_split"]["cold_ads"] == len(world["cold"])


def test_cold_ads_are_only_test_targets(world):
    t, cold, cold_sids = world["t"], world["cold"], world["cold_sids"]

    def mentions_cold(text) -> bool:
        return isinstance(text, str) and any(s in text for s in cold_sids)

    for split in ("train", "valid"):
        sft = t[f"sft/{split}"]
        assert len(sft) > 0
        assert not sft.target_ad_id.isin(cold).any(), split
        assert not sft.completion.isin(cold_sids).any(), split
        assert not sft.prompt.map(mentions_cold).any(), split
        dpo = t[f"dpo/{split}"]
        assert len(dpo) > 0
        assert not dpo.chosen_ad_id.isin(cold).any() and not dpo.rejected_ad_id.isin(cold).any()
        assert not dpo.prompt.map(mentions_cold).any(), split
        ev = t[f"eval/{split}"]
        assert not ev.target_ad_id.isin(cold).any(), split
    for split in ("train", "valid", "test"):  # no history, and no baseline sequence, has one
        ev = t[f"eval/{split}"]
        for col in ("history_ad_ids", "sequence_ad_ids"):
            assert not ev[col].map(lambda h: bool(set(h) & cold)).any(), (split, col)
        assert not ev.prompt.map(mentions_cold).any(), split
    test = t["eval/test"]
    on_cold = test[test.target_ad_id.isin(cold)]
    assert len(on_cold) > 0, "some test rows should target a cold ad"
    assert (on_cold.target_sid == on_cold.target_ad_id.map(world["table"].sid)).all()
    counts = world["manifest"]["counts"]
    assert counts["dropped_events"]["cold_ad"] > 0
    assert counts["notes"]["cold_ads_without_ad_tasks"] == len(cold)
    assert world["manifest"]["cold_ads"] == len(cold)
    assert world["manifest"]["summary"]["cold_split"]["events_dropped"] == \
        counts["dropped_events"]["cold_ad"]


def test_shards_engine_equals_single_process_builder_with_cold_ads(world):
    """The vectorised drop (build_shard) and the per-user one (build_user) agree row for row,
    under the time split (the module's Ray run) and under leave-one-out."""
    local = build_local(_prompt_cfg(world, "unused"), write=False)
    for (kind, split), table in local["tables"].items():
        if kind in ("sft", "dpo", "eval"):
            pd.testing.assert_frame_equal(canon(table.to_pandas()),
                                          canon(world["t"][f"{kind}/{split}"]),
                                          obj=f"{kind}/{split}")
    assert local["counts"] == world["manifest"]["counts"]

    cfg = _prompt_cfg(world, "unused", split="leave_one_out")
    catalog, _, _ = load_catalog(cfg)
    plan, _ = make_plan(cfg, None)
    loo = build_local(cfg, write=False)
    events = artifacts.read_table(world["ingest"], "events")
    users = artifacts.read_table(world["ingest"], "users")
    shard, flat = build_shard(events, users, catalog, cfg, plan)
    for key in (("sft", "train"), ("sft", "valid"), ("dpo", "train"), ("eval", "valid"),
                ("eval", "test")):
        want = loo["tables"][key].to_pandas()
        if "user_id" in want:  # (build_local adds the ad-level rows, which have no user)
            want = want[want.user_id.notna()]
        pd.testing.assert_frame_equal(canon(shard[key].to_pandas()), canon(want),
                                      obj=str(key))
    assert flat["note//dropped_cold_ad"] == loo["counts"]["dropped_events"]["cold_ad"] > 0
    cold = world["cold"]
    test = loo["tables"][("eval", "test")].to_pandas()
    assert test.target_ad_id.isin(cold).any()
    for key in (("sft", "train"), ("sft", "valid")):
        assert not loo["tables"][key].to_pandas().target_ad_id.isin(cold).any()
    for split in ("valid", "test"):
        ev = loo["tables"][("eval", split)].to_pandas()
        assert not ev.sequence_ad_ids.map(lambda h: bool(set(h) & cold)).any()
