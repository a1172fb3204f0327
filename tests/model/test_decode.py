"""Trie-constrained beam search: equals an exhaustive search and HF's constrained beam search,
never returns an invalid or inactive ad, follows active flags, works with a LoRA adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny_lm import tiny_model, tiny_table, tiny_tokenizer
from leadre.config import ConfigError
from leadre.model.config import GenerationConfig
from leadre.model.decode import Candidate, SidGenerator, hf_constrained_generate, invalid_rate

PROMPTS = ["click on ad <a_1><b_2><c_0> what ad will the user be interested in next time?",
           "play short video badminton",
           "x",
           "2 days ago^read news^market 3 days ago^click on ad<a_0><b_3><c_0>"]


@pytest.fixture(scope="module")
def world():
    table = tiny_table(n_ads=14, sizes=(3, 4), seed=1, inactive=3)
    tok = tiny_tokenizer(table.tokens())
    model = tiny_model(len(tok), seed=0)
    return table, tok, model


@torch.inference_mode()
def exhaustive(model, tok, table, prompt: str) -> list[tuple[str, float]]:
    """Score every active S-ID by its full-sequence log-prob after the prompt; sort."""
    p_ids = tok(prompt)["input_ids"]
    rows = np.flatnonzero(table.active)
    sid_ids = [tok.convert_tokens_to_ids(table.sid_tokens(table.ad_id_array[r])) for r in rows]
    ids = torch.tensor([p_ids + s for s in sid_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    n, d = len(p_ids), len(sid_ids[0])
    tgt = ids[:, n:]
    score = logp[:, n - 1:n - 1 + d].gather(-1, tgt[..., None])[..., 0].sum(-1)
    order = torch.argsort(score, descending=True, stable=True)
    return [(str(table.ad_id_array[rows[i]]), float(score[i])) for i in order]


def test_equals_exhaustive_reference(world):
    table, tok, model = world
    n_active = int(table.active.sum())
    gen = SidGenerator(model, tok, table, GenerationConfig(beam_size=n_active, top_k=n_active,
                                                         batch_size=3, device="cpu"))
    got = gen.generate(PROMPTS)  # batched, left-padded, two batches
    for prompt, cands in zip(PROMPTS, got):
        ref = exhaustive(model, tok, table, prompt)
        assert [c.ad_id for c in cands] == [a for a, _ in ref]
        np.testing.assert_allclose([c.score for c in cands], [s for _, s in ref], atol=1e-4)
        assert all(isinstance(c, Candidate) and table.sid(c.ad_id) == c.sid for c in cands)


def test_top_k_of_narrow_beam_matches_hf_generate(world):
    table, tok, model = world
    gen = SidGenerator(model, tok, table, GenerationConfig(beam_size=4, top_k=4, device="cpu"))
    rows, scores = gen.generate_rows(PROMPTS)
    ref_rows, ref_scores = hf_constrained_generate(model, tok, gen.trie, PROMPTS, 4)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)


def test_zero_invalid_and_never_inactive():
    table = tiny_table(n_ads=60, sizes=(4, 4, 3), seed=3, inactive=20)
    tok = tiny_tokenizer(table.tokens())
    model = tiny_model(len(tok), seed=5)
    gen = SidGenerator(model, tok, table, GenerationConfig(beam_size=10, top_k=10, device="cpu"))
    prompts = [f"user {i} click on ad {table.sid(table.ad_id_array[i])}" for i in range(30)]
    out = gen.generate(prompts)
    sids = [c.sid for cands in out for c in cands]
    assert len(sids) == 300
    assert invalid_rate(sids, table) == 0.0
    inactive = set(table.ad_id_array[~table.active])
    assert not inactive & {c.ad_id for cands in out for c in cands}
    for cands in out:  # distinct ads, best first
        assert len({c.ad_id for c in cands}) == len(cands)
        assert all(a.score >= b.score for a, b in zip(cands, cands[1:]))
    # Switching the favourite off removes it; switching it back on restores it.
    top = out[0][0].ad_id
    assert gen.set_active([top], False) == 1
    assert top not in {c.ad_id for c in gen.generate(prompts[:1])[0]}
    assert invalid_rate([out[0][0].sid], gen.table) == 1.0
    gen.set_active([top], True)
    assert gen.generate(prompts[:1])[0][0].ad_id == top
    # refresh_active rebuilds from a table's flags.
    table2 = tiny_table(n_ads=60, sizes=(4, 4, 3), seed=3, inactive=0)
    table2.set_active([top], False)
    gen.refresh_active(table2)
    assert top not in {c.ad_id for c in gen.generate(prompts[:1])[0]}


def test_fewer_active_ads_than_beams_and_none(world):
    table, tok, model = world
    small = tiny_table(n_ads=14, sizes=(3, 4), seed=1, inactive=12)  # 2 active
    gen = SidGenerator(model, tok, small, GenerationConfig(beam_size=8, top_k=5, device="cpu"))
    out = gen.generate(PROMPTS[:2])
    assert [len(c) for c in out] == [2, 2]
    small.set_active(small.ad_id_array[small.active].tolist(), False)
    gen.refresh_active(small)
    assert gen.generate(PROMPTS[:2]) == [[], []]


def test_lora_adapter_model(world):
    from peft import LoraConfig, get_peft_model

    table, tok, model = world
    import copy

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    n_active = int(table.active.sum())
    ref = exhaustive(peft_model, tok, table, PROMPTS[0])
    assert [a for a, _ in ref] != [a for a, _ in exhaustive(model, tok, table, PROMPTS[0])]
    for merge in (False, True):
        gen = SidGenerator(copy.deepcopy(peft_model), tok, table,
                           GenerationConfig(beam_size=n_active, top_k=n_active, device="cpu",
                                          merge_adapter=merge))
        got = gen.generate(PROMPTS[:1])[0]
        assert [c.ad_id for c in got] == [a for a, _ in ref]


def test_from_stage_dir(world, tmp_path):
    from leadre.artifacts import write_manifest

    table, tok, model = world
    model.save_pretrained(tmp_path / "sft" / "merged")
    tok.save_pretrained(tmp_path / "sft" / "merged")
    write_manifest(tmp_path / "sft", "sft", inputs={}, config={}, counts={}, timings={})
    table.save(str(tmp_path / "sids"))
    write_manifest(tmp_path / "sids", "sids", inputs={}, config={}, counts={}, timings={})
    gen = SidGenerator.from_stage_dir(str(tmp_path / "sft"), str(tmp_path / "sids"),
                                      GenerationConfig(beam_size=5, top_k=3, device="cpu"))
    direct = SidGenerator(model, tok, table, GenerationConfig(beam_size=5, top_k=3, device="cpu"))
    assert ([[c.ad_id for c in x] for x in gen.generate(PROMPTS)]
            == [[c.ad_id for c in x] for x in direct.generate(PROMPTS)])


def test_config_validation():
    with pytest.raises(ConfigError, match="beam_size"):
        GenerationConfig(beam_size=5, top_k=10, ranking="beam")
    # a fused list holds the beam's ads and the dense head's candidates
    assert GenerationConfig(beam_size=5, top_k=10).reach() == 55
    with pytest.raises(ConfigError, match="dense_candidates=50"):
        GenerationConfig(beam_size=5, top_k=56)
    with pytest.raises(ConfigError):
        GenerationConfig(batch_size=0)


def test_from_plain_model_dir(world, tmp_path):
    """A plain Hugging Face directory (no stage manifest) loads through the same loader."""
    table, tok, model = world
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    table.save(str(tmp_path / "sids"))
    from leadre.artifacts import write_manifest

    write_manifest(tmp_path / "sids", "sids", inputs={}, config={}, counts={}, timings={})
    cfg = GenerationConfig(beam_size=5, top_k=3, device="cpu")
    gen = SidGenerator.from_stage_dir(str(tmp_path / "hf"), str(tmp_path / "sids"), cfg)
    direct = SidGenerator(model, tok, table, cfg)
    assert ([[c.ad_id for c in x] for x in gen.generate(PROMPTS)]
            == [[c.ad_id for c in x] for x in direct.generate(PROMPTS)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model"):
        SidGenerator.from_stage_dir(str(tmp_path / "empty"), str(tmp_path / "sids"), cfg)
    # another stage's output is refused by its manifest, naming both stages
    from leadre.artifacts import ArtifactError

    with pytest.raises(ArtifactError, match="stage 'sids', expected 'sft' or 'dpo'"):
        SidGenerator.from_stage_dir(str(tmp_path / "sids"), str(tmp_path / "sids"), cfg)
