"""Checkpoint choice by retrieval quality: the SFT stage's ``GenerationMetric`` callback adds
the validation users' HR@10 under trie-constrained decoding to each evaluation."""

import pytest
from transformers import TrainerState

from _tiny_lm import tiny_model, tiny_table, tiny_tokenizer
from leadre.artifacts import write_manifest
from leadre.model.config import GenerationConfig


def test_generation_metric_adds_hr_at_10_to_the_evaluation(tmp_path):
    from leadre.model.decode import SidGenerator
    from leadre.train.callbacks import GenerationMetric

    table = tiny_table(n_ads=30, sizes=(5, 6))
    table.save(str(tmp_path))
    write_manifest(tmp_path, "sids", inputs={}, config={}, counts={}, timings={})
    tok = tiny_tokenizer(table.tokens())
    model = tiny_model(len(tok)).train()
    prompts = ["click on ad " + table.sid(f"ad{i}") + " what next?" for i in range(12)]
    rows = [(p, f"ad{(3 * i) % 30}") for i, p in enumerate(prompts)]
    # the decoder's own answer, to compare with what the callback reports
    gen = SidGenerator(model.eval(), tok, table, GenerationConfig(beam_size=10, top_k=10,
                                                                merge_adapter=False))
    top = gen.generate(prompts)
    expected = sum(t in {c.ad_id for c in cands} for (_, t), cands in zip(rows, top)) / len(rows)
    assert 0 < expected < 1  # a random model finds some targets, not all

    model.train()
    state = TrainerState()
    state.log_history = [{"eval_loss": 2.0, "step": 10}]
    metrics = {"eval_loss": 2.0}
    cb = GenerationMetric(rows, str(tmp_path), GenerationConfig(beam_size=10, top_k=10),
                          rank=0, world=1)
    cb.on_evaluate(None, state, None, model=model, processing_class=tok, metrics=metrics)
    assert metrics["eval_hr@10"] == pytest.approx(expected)
    assert state.log_history[-1]["eval_hr@10"] == pytest.approx(expected, abs=1e-6)
    assert model.training  # training mode is restored


def test_a_rank_decodes_only_its_slice():
    from leadre.train.callbacks import GenerationMetric

    rows = [(f"p{i}", f"ad{i}") for i in range(7)]
    a = GenerationMetric(rows, "unused", GenerationConfig(), rank=0, world=2)
    b = GenerationMetric(rows, "unused", GenerationConfig(), rank=1, world=2)
    assert len(a.rows) + len(b.rows) == 7 and not set(a.rows) & set(b.rows)


def test_sft_defaults_follow_the_base_model():
    from leadre.config import ConfigError
    from leadre.train.config import DpoConfig
    from leadre.train.config import SftConfig

    scratch = SftConfig(prompts_dir="p")
    assert scratch.finetune == "full" and scratch.selection_metric == "hr@10"
    assert SftConfig(prompts_dir="p", base_model="/m").finetune == "lora"
    assert SftConfig(prompts_dir="p", finetune="lora").finetune == "lora"
    assert DpoConfig(prompts_dir="p").selection_metric == "eval_loss"
    with pytest.raises(ConfigError, match="top_k 10"):
        SftConfig(prompts_dir="p", generation=GenerationConfig(beam_size=10, top_k=5))
