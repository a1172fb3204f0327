"""The model factory (no Ray): tokenizers with atomic S-ID tokens, models from scratch and from a
local checkpoint, the LoRA wiring that keeps new S-ID rows trainable, and config validation."""

from __future__ import annotations

import pytest

from leadre.artifacts import ArtifactError
from leadre.config import ConfigError
from leadre.model.factory import (PRESETS, add_sid_tokens, embedding_module_names, load_model,
                          load_tokenizer, prepare_base_model, train_tokenizer)

SID_TOKENS = [f"<{p}_{i}>" for p in "abcd" for i in range(8)]
CORPUS = [f"Assuming you are an ad recommendation system. 3 days ago^click on ad^<a_{i % 8}><b_1>"
          f"<c_2><d_0>; 2 days ago^play short video^tennis match {i}. What ad will the user be "
          "interested in next time?" for i in range(40)] + ["<a_1><b_2><c_3><d_0>", "tennis offer 3"]
SID = "<a_3><b_7><c_0><d_1>"


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_tokenizer_keeps_sid_tokens_atomic_and_round_trips():
    tok = train_tokenizer(CORPUS, SID_TOKENS, vocab_size=300)
    ids = _ids(tok, SID + tok.eos_token)
    assert tok.convert_ids_to_tokens(ids) == ["<a_3>", "<b_7>", "<c_0>", "<d_1>", "</s>"]
    prompt = "click on ad^<a_1><b_2><c_3><d_0>; what next?"
    assert tok.decode(_ids(tok, prompt)) == prompt
    # no merge was wasted on pieces of S-ID tokens
    assert not any("_" in t and t.startswith("<") and t not in SID_TOKENS
                   for t in tok.get_vocab())
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>"


def test_from_scratch_model_dir_loads_like_any_model(tmp_path):
    info = prepare_base_model(tmp_path / "m", sid_tokens=SID_TOKENS, base_model=None,
                              preset="tiny", corpus=CORPUS)
    model, tok = load_model(tmp_path / "m"), load_tokenizer(tmp_path / "m")
    assert info["source"] == "preset:tiny" and info["sid_tokens_added"] == len(SID_TOKENS)
    assert model.config.model_type == "llama" and not info["tied_embeddings"]
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == info["vocab_size"]
    assert model.config.hidden_size == PRESETS["tiny"].hidden_size
    assert all(t in tok.get_vocab() for t in SID_TOKENS)
    assert model.generation_config.eos_token_id == tok.eos_token_id


def _qwen2_checkpoint(path, tok):
    """A stand-in for a downloaded Qwen2 checkpoint: tied embeddings, a `qwen2` config, a
    tokenizer without any S-ID token."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      tie_word_embeddings=True, max_position_embeddings=256)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def test_local_checkpoint_gets_sid_tokens_and_keeps_its_tokenization(tmp_path):
    plain = train_tokenizer(CORPUS, [], vocab_size=300)
    _qwen2_checkpoint(tmp_path / "qwen", plain)
    info = prepare_base_model(tmp_path / "m", sid_tokens=SID_TOKENS,
                              base_model=str(tmp_path / "qwen"), preset="tiny")
    assert info["sid_tokens_added"] == len(SID_TOKENS) and info["tied_embeddings"]
    tok, model = load_tokenizer(tmp_path / "m"), load_model(tmp_path / "m")
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == len(plain) + len(SID_TOKENS)
    # The Qwen2 trap: the saved tokenizer.json is used verbatim (digits are not re-split).
    text = "3 days ago^play short video^tennis match 12"
    assert _ids(tok, text) == _ids(plain, text)
    assert len(_ids(tok, SID)) == 4
    # adding the same tokens again is a no-op
    assert add_sid_tokens(model, tok, SID_TOKENS) == 0
    assert embedding_module_names(model) == ("embed_tokens", "lm_head", True)


def test_missing_base_model_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="nothing is downloaded"):
        prepare_base_model(tmp_path / "m", sid_tokens=SID_TOKENS, base_model="Qwen/Qwen2.5-0.5B",
                           preset="tiny")


def test_lora_trains_new_sid_rows_untied_and_tied(tmp_path):
    from leadre.train.config import SftConfig
    from leadre.train.common import lora_config

    prepare_base_model(tmp_path / "m", sid_tokens=SID_TOKENS, base_model=None, preset="tiny",
                       corpus=CORPUS)
    untied = lora_config(SftConfig(), load_model(tmp_path / "m"))
    assert set(untied.modules_to_save) == {"embed_tokens", "lm_head"}
    assert not untied.ensure_weight_tying and untied.target_modules == "all-linear"
    _qwen2_checkpoint(tmp_path / "q", train_tokenizer(CORPUS, SID_TOKENS, 300))
    tied = lora_config(SftConfig(lora_target_modules=["q_proj", "v_proj"]),
                       load_model(tmp_path / "q"))
    assert list(tied.modules_to_save) == ["embed_tokens"] and tied.ensure_weight_tying
    assert set(tied.target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize("cls, overrides, message", [
    ("SftConfig", {"out": "s3://bucket/sft"}, "local or mounted path"),
    ("SftConfig", {"batch_size": 0}, "batch_size must be >= 1"),
    ("SftConfig", {"tasks": ["main", "chitchat"]}, "unknown task"),
    ("SftConfig", {"epochs": 0.0}, "train for something"),
    ("SftConfig", {"preset": "huge"}, "not one of"),
    ("SftConfig", {"cpus_per_worker": 0}, "cpus_per_worker"),
    ("DpoConfig", {"beta": 0.0}, "beta must be > 0"),
    ("DpoConfig", {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, "loss_weights"),
    ("DpoConfig", {"loss_type": ["simpo"]}, "not one of"),
])
def test_training_configs_reject_impossible_values(cls, overrides, message):
    from leadre.config import load_config
    from leadre.train import config

    with pytest.raises(ConfigError, match=message):
        load_config(getattr(config, cls), overrides=overrides)
