"""The dense head's pieces on real tensors and a real (tiny) transformers model: which state
it reads, which ad a row answers, its loss, the fused ranking and the tuning of its weight,
saving and the encoder check at load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from leadre.artifacts import ArtifactError
from leadre.model import dense


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_targets_are_the_answered_ads_read_at_the_last_prompt_token():
    keys = dense.sid_keys(np.array([[5, 6, 7], [5, 6, 8]]))
    labels = torch.tensor([[-100, -100, -100, 5, 6, 8, 2, -100],   # answers ad 1 (+ EOS)
                           [-100, -100, 5, 6, 7, 2, -100, -100],   # answers ad 0
                           [-100, -100, -100, 40, 41, 2, -100, -100]])  # text, not an S-ID
    last_prompt, index = dense.targets_of(labels, keys, depth=3)
    assert last_prompt.tolist() == [2, 1, 2]
    assert index.tolist() == [1, 0, -1]


def test_dense_loss_learns_to_point_at_the_answered_ad_and_sharpens():
    torch.manual_seed(0)
    catalog = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1)
    head = dense.DenseHead(hidden_size=16, dim=8, temperature=0.5)
    hidden = torch.randn(12, 4, 16)
    index = torch.arange(12) % 30
    last = torch.full((12,), 3)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = None
    for _ in range(200):
        loss, top1 = dense.dense_loss(head, hidden, last, index, catalog, "full")
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 5 and top1 == 1.0
    assert head.temperature() < 0.5  # the learnt temperature sharpened the softmax
    in_batch, _ = dense.dense_loss(head, hidden, last, index, catalog, "in_batch")
    assert in_batch.item() <= loss.item() + 1e-6  # fewer negatives, never a harder softmax
    # a batch answering no catalog ad still touches the head (DDP needs its gradient)
    zero, _ = dense.dense_loss(head, hidden, last, torch.full((12,), -1), catalog)
    zero.backward()
    assert zero.item() == 0.0 and head.weight.grad is not None


def test_dense_log_probs_are_a_softmax_over_the_active_ads():
    vectors = _unit(np.random.default_rng(0).normal(size=(5, 4)))
    active = np.array([True, True, False, True, True])
    lp = dense.dense_log_probs(vectors[:2], vectors, active, 0.1)
    assert np.allclose(np.exp(lp).sum(axis=1), 1.0) and np.isneginf(lp[:, 2]).all()
    assert lp[0].argmax() == 0 and lp[1].argmax() == 1


def test_fusion_weighs_both_and_lets_an_ad_the_model_never_learnt_compete_on_its_vector():
    beam_rows = np.array([[0, 1, 2]])
    beam_scores = np.log(np.array([[0.5, 0.2, 0.1]], np.float32))
    dense_rows = np.array([[3, 4, 0]])
    dense_lp = np.log(np.array([[0.05, 0.01, 0.01, 0.3, 0.6]]))
    seen = np.zeros(5, bool)
    rows, _ = dense.fuse(beam_rows, beam_scores, dense_rows, dense_lp, seen, 0.0, 3)
    assert rows.tolist() == [[0, 1, 2]]                   # weight 0: the beam's order
    rows, scores = dense.fuse(beam_rows, beam_scores, dense_rows, dense_lp, seen, 1.0, 2)
    assert rows.tolist() == [[4, 3]]                      # weight 1: the dense head's
    # an ad off the beam takes the beam's lowest log-prob (0.1) for its LM side
    rows, scores = dense.fuse(beam_rows, beam_scores, dense_rows, dense_lp, seen, 0.5, 5)
    assert np.isclose(scores[0][list(rows[0]).index(4)], 0.5 * np.log(0.1) + 0.5 * np.log(0.6))
    # an ad the model never trained on competes on the head's estimate alone, at any weight
    unseen = np.array([False, False, False, False, True])
    rows, scores = dense.fuse(beam_rows, beam_scores, dense_rows, dense_lp, unseen, 0.0, 3)
    assert rows.tolist() == [[4, 0, 1]] and np.isclose(scores[0, 0], np.log(0.6))


def test_fusion_tuning_gives_unseen_ads_the_exposure_accuracy_allows():
    rng = np.random.default_rng(0)
    vectors = _unit(rng.normal(size=(40, 8)))
    targets = np.arange(20)
    users = _unit(vectors[targets] + 0.05 * rng.normal(size=(20, 8)))  # the dense side is right
    beam_rows = np.stack([np.roll(np.arange(40), -(t + 5))[:10] for t in targets])  # beam misses
    beam_scores = np.tile(-np.arange(1, 11, dtype=np.float32), (20, 1))
    dense_lp = dense.dense_log_probs(users, vectors, np.ones(40, bool), 0.05)
    dense_rows = np.argsort(-dense_lp, axis=1)[:, :10]
    pseudo = np.zeros(40, bool)
    pseudo[:4] = True                                     # 4 of the 20 targets stand in unseen
    weight, (a, b), curves = dense.tune_fusion(beam_rows, beam_scores, dense_rows, dense_lp,
                                               pseudo, targets)
    by_w = curves["hr@10_by_weight"]
    assert by_w["0.0"] < 1.0 and weight > 0 and by_w[str(weight)] == curves["best_hr@10"] == 1.0
    assert curves["pseudo_unseen_targets"] == 4
    assert max(curves["unseen_hr@10_by_offset"].values()) == 1.0


def test_head_saves_and_a_head_of_another_encoder_is_refused(tmp_path):
    head = dense.DenseHead(16, 8, seed=3)
    meta = dense.DenseMeta(encoder_version="hf:a:1", sid_version="v", hidden_size=16, dim=8,
                           temperature=0.05)
    dense.save(tmp_path / dense.DENSE_DIR, head, meta)
    dense.set_fusion(tmp_path / dense.DENSE_DIR, 0.5, (1.0, 0.0), {"rows": 3})
    loaded, got = dense.load_head(dense.find(tmp_path))
    assert torch.equal(loaded.weight, head.weight) and got.fusion_weight == 0.5
    dense.check_encoder(got, "hf:a:1", "m", "s")
    with pytest.raises(ArtifactError, match="encoder hf:a:1.*encoder lsa:2"):
        dense.check_encoder(got, "lsa:2", "the model", "the sids dir")
    assert dense.find(tmp_path / "nowhere") is None


def test_capture_reads_the_backbone_state_the_lm_head_sees():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2)).eval()
    ids = torch.randint(0, 50, (2, 5))
    capture = dense.HiddenCapture(model, keep="first")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        model(input_ids=ids[:, :2])                     # a later step is not kept
    hidden = capture.pop()
    assert hidden.shape == (2, 5, 16)
    assert torch.allclose(model.lm_head(hidden), logits, atol=1e-5)
    capture.close()


def test_soft_targets_reward_pointing_near_the_answer_not_only_at_it():
    """With soft targets a head pointing at the answer's close neighbour loses less than one
    pointing at a far ad, and less than under a one-hot target."""
    catalog = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.0, 0.0], [0.95, 0.3, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    head = dense.DenseHead(hidden_size=3, dim=3, temperature=0.05)
    head.weight.data.copy_(torch.eye(3))
    hidden = catalog[[1, 2]][:, None, :]                  # point at ad 1 (near 0), ad 2 (far)
    index, last = torch.tensor([0, 0]), torch.zeros(2, dtype=torch.long)
    near_soft, _ = dense.dense_loss(head, hidden[:1], last[:1], index[:1], catalog, "full", 0.1)
    far_soft, _ = dense.dense_loss(head, hidden[1:], last[1:], index[1:], catalog, "full", 0.1)
    near_hard, _ = dense.dense_loss(head, hidden[:1], last[:1], index[:1], catalog, "full")
    assert near_soft < far_soft
    assert near_soft < near_hard  # the soft target forgives the neighbour


def test_soft_target_temperature_keeps_the_answers_share_in_any_catalog():
    rng = np.random.default_rng(0)
    spread = _unit(rng.normal(size=(300, 16)))
    close = _unit(rng.normal(size=(300, 16)) * 0.3 + 1.0)  # vectors packed together
    for vectors in (spread, close):
        t = dense.soft_target_temperature(vectors, 0.65)
        sims = vectors @ vectors.T
        z = np.exp((sims - sims.max(axis=1, keepdims=True)) / t)
        assert abs((z.max(axis=1) / z.sum(axis=1)).mean() - 0.65) < 0.01
    assert dense.soft_target_temperature(close, 0.65) < dense.soft_target_temperature(spread, 0.65)
    assert dense.soft_target_temperature(spread, 1.0) == 0.0  # one-hot
