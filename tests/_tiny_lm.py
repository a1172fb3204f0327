"""A tiny random Llama + locally trained tokenizer holding the S-ID tokens of a table, for
generation and evaluation tests (no download)."""

from __future__ import annotations

import numpy as np
import torch


def tiny_tokenizer(sid_tokens: list[str], corpus: list[str] | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = corpus or ["assuming you are an ad recommendation system",
                        "what ad will the user be interested in next time?",
                        "click on ad play short video read news days ago times"] * 4
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
    fast.add_tokens(sid_tokens)
    return fast


def tiny_model(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, pad_token_id=0, bos_token_id=2,
                      eos_token_id=3, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    # Sharpen the output distribution so beams differ clearly (random init is near-uniform).
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


def tiny_table(n_ads: int = 12, sizes=(3, 4), seed: int = 0, inactive: int = 0):
    from leadre.sids.table import SidTable

    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, k, n_ads) for k in sizes], axis=1)
    active = np.ones(n_ads, bool)
    active[:inactive] = False
    return SidTable.from_codes([f"ad{i}" for i in range(n_ads)], codes, list(sizes), active)
