"""The Generator tier's core with a real (tiny, untrained) LLM: user context -> intent-aware
prompt -> trie-constrained beam search -> S-IDs of active ads -> store with TTL + versions."""

from __future__ import annotations

import time

import pytest

from leadre.artifacts import write_manifest
from leadre.model.config import GenerationConfig
from leadre.serve import GeneratorConfig, ServePaths
from leadre.index.context import build_prompt, user_contexts
from leadre.serve.generator import GeneratorCore
from leadre.sids import load_table
from leadre.serve.store import open_store

from serving_world import make_world, tiny_model


@pytest.fixture(scope="module")
def llm_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    w = make_world(root, ads=300, users=40)
    w.update(model=tiny_model(w, root / "sft"), contexts=user_contexts(w["ingest"]))
    return w


def _llm_core(llm_world, url: str, ttl_s: float = 86_400.0, **generation) -> GeneratorCore:
    """The LLM generator core on ``llm_world`` and a store at ``url`` holding its contexts."""
    with open_store(url) as store:
        store.put_users(llm_world["contexts"])
    return GeneratorCore(GeneratorConfig(ttl_s=ttl_s, generation=GenerationConfig(**generation)),
                         ServePaths(llm_world["sids"], url, model_dir=llm_world["model"]))


def test_prompt_follows_the_training_template(llm_world):
    from leadre.prompts import templates as T

    table = load_table(llm_world["sids"])
    uid, ctx = next(iter(llm_world["contexts"].items()))
    p = build_prompt(ctx, table)
    assert p.startswith(T.PROMPT_TEMPLATES[0].instruction)
    assert p.endswith(T.PROMPT_TEMPLATES[0].question)
    assert "<a_" in p  # ad behaviours are written as S-IDs
    assert build_prompt(None, table).startswith(T.PROMPT_TEMPLATES[0].instruction)
    prompts = pytest.importorskip("leadre.prompts")
    # The same text the prompts stage would build from these events.
    events = [{**e, "ts": int(e["ts"] * 1000)} for e in ctx["events"]]
    cats = {e["ad_id"]: e["category"] for e in events if e.get("category")}
    assert p == prompts.build_user_prompt(ctx["profile"], events, lambda a: table.sids([a])[0],
                                          ad_category_of=cats.get)


def test_llm_generator_writes_active_sids_with_versions(llm_world, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    core = _llm_core(llm_world, url, ttl_s=300, top_k=5, beam_size=8, batch_size=4)
    store = open_store(url)
    users = list(llm_world["contexts"])[:8]
    store.enqueue(users)
    assert core.engine == "llm" and core.model_version.startswith("sft-")
    t0 = time.perf_counter()
    out = core.generate_and_store(users + ["unknown-user"])
    assert out.written == 9 and time.perf_counter() - t0 < 120
    table = load_table(llm_world["sids"])
    for u in users:
        rec = store.get(u)
        assert len(rec.sids) == 5 and rec.sid_version == table.version
        rows = table.rows_of_sids(rec.sids)
        assert (rows >= 0).all() and table.active[rows].all()  # valid, active only
        assert rec.scores == sorted(rec.scores, reverse=True)
    assert store.queue_depth() == 0  # acked


def test_generator_builds_prompts_the_way_the_model_was_trained(llm_world, tmp_path):
    """The serving prompt follows the training manifest's PromptConfig (here: no profile,
    no categories), not the defaults."""
    import shutil

    from leadre.artifacts import read_manifest
    from leadre.prompts import PromptConfig, trained_prompt_config

    model = tmp_path / "sft"
    shutil.copytree(llm_world["model"], model)
    # (a recorded config without content_object predates knowledge tokens: titles)
    trained = PromptConfig(profile=False, categories=False, max_events=3, content_object="title")
    write_manifest(str(model), "sft", inputs={}, config={}, counts={}, timings={},
                   extra={"prompt_config": {**read_manifest(llm_world["model"]).get("config", {}),
                                            "profile": False, "categories": False,
                                            "max_events": 3}})
    assert trained_prompt_config(str(model)) == trained
    core = GeneratorCore(GeneratorConfig(), ServePaths(llm_world["sids"],
                                                       f"sqlite:///{tmp_path / 's.db'}",
                                                       model_dir=str(model)))
    assert core.prompt_cfg == trained
    table = load_table(llm_world["sids"])
    uid, ctx = next((u, c) for u, c in llm_world["contexts"].items() if len(c["events"]) > 3)
    default, served = build_prompt(ctx, table), build_prompt(ctx, table, cfg=core.prompt_cfg)
    assert served != default and len(served) < len(default)
    assert served.count("<a_") <= 3 < default.count("<a_")
    # A plain model directory falls back to the defaults.
    assert trained_prompt_config(str(tmp_path)) == PromptConfig()


def test_generator_trie_follows_the_live_ad_status(llm_world, tmp_path):
    """Ads switched off through the store (the admin call) take no beam slot of the LLM's
    decoder; switched back on, they can come back."""
    url = f"sqlite:///{tmp_path / 'ads.db'}"
    core = _llm_core(llm_world, url, top_k=8, beam_size=8, batch_size=8)
    store = open_store(url)
    users = list(llm_world["contexts"])[:8]
    core.generate_and_store(users)
    table = load_table(llm_world["sids"])
    before = {a for u in users for a in table.ad_ids(store.get(u).sids)}
    assert not core.follow_ad_status()  # nothing switched off yet
    off = sorted(before)[:len(before) // 2]
    store.set_ads_active(off, False)
    assert core.follow_ad_status() and core.off == frozenset(off)
    core.generate_and_store(users)
    after = {a for u in users for a in table.ad_ids(store.get(u).sids)}
    assert after and not after & set(off)
    store.set_ads_active(off, True)
    assert core.follow_ad_status() and not core.off
    assert int(core.llm.trie.active_count[0]) == int(table.active.sum())


def test_generator_swaps_its_model_and_finds_the_users_left_to_regenerate(llm_world,
                                                                          tmp_path):
    import shutil

    from leadre.artifacts import read_manifest

    url = f"sqlite:///{tmp_path / 'roll.db'}"
    core = _llm_core(llm_world, url, top_k=5, beam_size=5, batch_size=8)
    store = open_store(url)
    users = list(llm_world["contexts"])[:6]
    core.generate_and_store(users)
    old = core.model_version
    new_dir = tmp_path / "dpo"
    shutil.copytree(llm_world["model"], new_dir)
    m = read_manifest(llm_world["model"])
    write_manifest(str(new_dir), "dpo", inputs={}, config=m.get("config", {}), counts={},
                   timings={}, extra={"sid_version": m.get("sid_version")})
    new = core.swap_model(str(new_dir))
    assert new != old and new.startswith("dpo-") and core.model_version == new
    assert sorted(store.users_not_of_model(new)) == sorted(users)
    core.generate_and_store(users[:4])
    assert sorted(store.users_not_of_model(new)) == sorted(users[4:])
    assert {store.get(u).model_version for u in users[:4]} == {new}
