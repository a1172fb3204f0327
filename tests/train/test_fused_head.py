"""TRL's fused LM head on CPU, with and without :func:`score_labelled_positions_only`: the same
loss, per-token outputs and gradients, from projecting only the labelled positions."""

from __future__ import annotations

import pytest
import torch
import trl.trainer.utils as trl_utils
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head

from leadre.train.common import score_labelled_positions_only


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch, fused_lm_head=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_fused_head_on_cpu_scores_labelled_positions_only(monkeypatch):
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)  # restored after
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=4, pad_token_id=0))
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(1, 97, (3, 40))
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # a padded row
    labels = torch.full_like(ids, -100)
    labels[0, 34:], labels[1, 35:], labels[2, 24:30] = ids[0, 34:], ids[1, 35:], ids[2, 24:30]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    rows = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply",
                        lambda hidden, *a: rows.append(hidden.shape[0]) or apply(hidden, *a))
    before, g_before = _loss_and_grads(model, batch)
    score_labelled_positions_only()
    patched = trl_utils._use_triton
    score_labelled_positions_only()  # idempotent: one wrapper, not two
    assert trl_utils._use_triton is patched and patched(torch.device("cpu"))
    after, g_after = _loss_and_grads(model, batch)

    labelled = int((labels[:, 1:] != -100).sum())
    assert rows == [3 * 39, labelled] and labelled == 6 + 5 + 6
    torch.testing.assert_close(after.loss, before.loss)
    for field in ("log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(after, field), getattr(before, field))
    assert g_after.keys() == g_before.keys() and len(g_after) > 5
    for name in g_before:
        torch.testing.assert_close(g_after[name], g_before[name], msg=name)
