"""Trie-constrained, batched beam search over Semantic IDs: prompt -> top-K distinct active ads.

The decoder is written for the shape of the problem rather than on top of ``model.generate``:

* **One prefill per prompt, not per beam.** The left-padded prompt batch runs once (with
  ``logits_to_keep=1``); the first S-ID token is chosen from that single row, and only then is
  the KV cache expanded to the beams (``Cache.reorder_cache`` = ``index_select`` on the batch
  dimension). ``model.generate(num_beams=W)`` copies every prompt W times before the prefill.
* **Sparse, vectorised constraints.** At each S-ID level only the trie children of the live
  beams are scored: ``(beam, token)`` pairs come from the trie arrays in one numpy pass, their
  log-probs are gathered on the device and the best ``W`` per prompt picked with one ``topk``.
  No per-beam Python callback, no dense ``(beams, vocab)`` mask.
* **Fixed depth.** Every S-ID has exactly ``trie.depth`` tokens, so the search runs ``depth``
  steps and needs no end-of-sequence bookkeeping; the last step needs no forward pass.

Scores are full-vocabulary log-probabilities of the S-ID tokens given the prompt (the
softmax is over the whole vocabulary, the constraint only restricts which continuations are
kept), which is what ``model.generate`` with ``prefix_allowed_tokens_fn`` and
``length_penalty=0`` ranks by, and what the exhaustive reference in the tests computes.

Every returned S-ID is a leaf of the trie of *active* ads, so an invalid or inactive output
is impossible by construction (:func:`invalid_rate` measures it anyway).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from leadre.config import ConfigError
from leadre.model.batching import length_buckets, reorder_generated, reserve
from leadre.sids.table import SidTable, format_sid
from leadre.sids.trie import SidTrie
from leadre.model.config import GenerationConfig

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One generated ad: its id, S-ID and log p(S-ID | prompt)."""

    ad_id: str
    sid: str
    score: float


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch.cuda.is_available() is False; use device=auto")
    return torch.device(device)


def _expand(trie: SidTrie, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(beam row, child node) for every active child of every live beam (DEAD beams: none).
    Rows come out ascending and, within a row, children in code order."""
    live = nodes >= 0
    safe = np.maximum(nodes, 0)
    counts = np.where(live, trie.n_children[safe], 0)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    row = np.repeat(np.arange(len(nodes)), counts)
    offs = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    child = np.repeat(trie.first_child[safe].astype(np.int64), counts) + offs
    keep = trie.active_count[child] > 0
    return row[keep], child[keep]


def _forward_kwargs(model: Any) -> tuple[str, dict[str, Any]]:
    """(name of the KV-cache argument, extra prefill kwargs) for this model's forward:
    transformers >= 5.2x calls the cache ``cache`` (``past_key_values`` is deprecated)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return name, extra


@torch.inference_mode()
def constrained_beam_search(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            trie: SidTrie, beam_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Beam search over the active S-IDs of ``trie`` for a left-padded prompt batch.

    Returns ``(rows, scores)``, both ``(batch, beams)`` with beams sorted best first: the
    SID-table row of each found ad (-1 where fewer than ``beams`` ads exist) and its summed
    log-probability (-inf for the missing ones). ``beams = min(beam_size, #active ads)``.
    """
    from transformers import DynamicCache

    device = input_ids.device
    n_prompts = input_ids.shape[0]
    depth = trie.depth
    n_active = int(trie.active_count[0]) if trie.n_nodes else 0
    width = min(beam_size, n_active)
    if n_prompts == 0 or width == 0:
        return np.full((n_prompts, 0), -1, np.int64), np.zeros((n_prompts, 0), np.float32)

    mask = attention_mask.to(device=device, dtype=torch.long)
    position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = reserve(DynamicCache(config=getattr(model, "config", None)), depth)
    cache_arg, extra = _forward_kwargs(model)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position,
                use_cache=True, **{cache_arg: cache}, **extra)
    logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
    del out
    next_pos = position[:, -1]  # position of the last prompt token, per row
    prompt_len = input_ids.shape[1]

    nodes = np.zeros(n_prompts, np.int64)  # one row per prompt before the first step
    scores = torch.zeros(n_prompts, device=device)
    beams_now = 1
    for t in range(depth):
        row, child = _expand(trie, nodes)
        tok = trie.token_ids[t][trie.code[child]]
        prompt = row // beams_now
        counts = np.bincount(prompt, minlength=n_prompts)
        n_cand = int(counts.max()) if len(counts) else 0
        k = min(width, n_cand)
        slot = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)

        row_t = torch.from_numpy(row).to(device)
        cand = scores[row_t] + logp[row_t, torch.from_numpy(tok).to(device)]
        dense = torch.full((n_prompts, n_cand), float("-inf"), device=device)
        dense[torch.from_numpy(prompt).to(device), torch.from_numpy(slot).to(device)] = cand
        top_scores, top_slot = dense.topk(k, dim=1)  # sorted, best first

        # Map (prompt, slot) back to candidate index; slots past a prompt's count are padding.
        top_slot = top_slot.cpu().numpy()
        starts = np.cumsum(counts) - counts
        valid = top_slot < counts[:, None]
        cand_idx = np.where(valid, starts[:, None] + top_slot, 0)
        parent = np.where(valid, row[cand_idx] if len(row) else 0,
                          np.arange(n_prompts)[:, None] * beams_now).reshape(-1)
        nodes = np.where(valid, child[cand_idx] if len(child) else -1, -1).reshape(-1)
        new_tok = np.where(valid, tok[cand_idx] if len(tok) else 0, 0).reshape(-1)
        scores = top_scores.reshape(-1)
        beams_now = k
        if t == depth - 1:
            break
        parent_t = torch.from_numpy(parent).to(device)
        if t == 0:
            cache.reorder_cache(parent_t)  # one row per prompt -> one per beam
        else:
            reorder_generated(cache, parent_t, prompt_len)
        mask = torch.cat([mask[parent_t], mask.new_ones(len(parent), 1)], dim=1)
        next_pos = next_pos[parent_t] + 1
        out = model(input_ids=torch.from_numpy(new_tok).to(device)[:, None], attention_mask=mask,
                    position_ids=next_pos[:, None], use_cache=True, **{cache_arg: cache})
        logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
        del out

    rows = trie.rows(nodes).reshape(n_prompts, beams_now)
    final = scores.float().cpu().numpy().reshape(n_prompts, beams_now)
    rows = np.where(np.isfinite(final), rows, -1)
    return rows, final


def invalid_rate(sids: Sequence[str], table: SidTable) -> float:
    """Share of generated S-IDs that do not map to an active ad of ``table`` (0 for this
    decoder by construction; measured by the eval report)."""
    if not len(sids):
        return 0.0
    rows = table.rows_of_sids(sids)
    ok = (rows >= 0) & table.active[np.maximum(rows, 0)]
    return float(1.0 - ok.mean())


class SidGenerator:
    """Generates the top-K distinct active ads for a batch of prompts.

    ``model`` is any Hugging Face causal LM (a PEFT model works too), ``tokenizer`` its
    tokenizer holding the S-ID tokens of ``table``. The trie covers the table's *active* ads;
    call :meth:`set_active` or :meth:`refresh_active` when ads switch on or off.
    """

    def __init__(self, model: Any, tokenizer: Any, table: SidTable, cfg: GenerationConfig | None = None,
                 dense: tuple[Any, Any] | None = None, vectors: np.ndarray | None = None,
                 trained_ads: frozenset[str] | None = None):
        self.cfg = cfg or GenerationConfig()
        self.device = resolve_device(self.cfg.device)
        if self.cfg.merge_adapter and hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}.get(self.cfg.dtype)
        if dtype is None and self.cfg.dtype == "auto" and self.device.type == "cuda" \
                and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        model = model.to(self.device) if dtype is None else model.to(self.device, dtype=dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "left"
        # The dense head ((DenseHead, DenseMeta)) and the unit vectors of the table's rows
        self.head, self.dense_meta = dense if dense is not None else (None, None)
        self.vectors = vectors
        # the ads the model trained on (None: all of them); the others are scored by the
        # dense head alone (leadre.model.dense.fuse)
        self.trained_ads = trained_ads
        self.unseen = None
        self.index = None  # a ScaNN AdIndex answering the dense query (serving)
        self._index_rows = None
        self._capture = None
        if self.head is not None:
            from leadre.model.dense import HiddenCapture

            self.head = self.head.to(self.device)
            self._capture = HiddenCapture(self.model, keep="first")
        self.refresh_active(table)

    # --- catalog ------------------------------------------------------------------------

    def refresh_active(self, table: SidTable, vectors: np.ndarray | None = None) -> None:
        """Rebuild the trie from ``table`` (its current active flags), with ``vectors`` (its
        rows' unit vectors) when the catalog grew. No model change."""
        if vectors is not None:
            self.vectors = vectors
        if self.vectors is not None and len(self.vectors) != len(table):
            raise ValueError(f"{len(self.vectors)} ad vectors for a table of {len(table)} ads")
        self.table = table
        self.trie = SidTrie.from_table(table, self.tokenizer.get_vocab())
        if self.trained_ads is not None:
            self.unseen = ~np.isin(table.ad_id_array.astype(str), list(self.trained_ads))
        if self.index is not None:
            self.use_index(self.index)

    def use_index(self, index: Any) -> None:
        """Answer the dense query with ``index`` (a :class:`~leadre.index.ann.AdIndex` over
        the same encoder's vectors) instead of exact search over the table."""
        self.index = index
        self._index_rows = self.table.rows_of(index.ad_ids)

    @property
    def fused(self) -> bool:
        """Whether :meth:`generate` fuses the dense head's candidates with the beam's."""
        return self.head is not None and self.cfg.ranking == "fused"

    @property
    def fusion_weight(self) -> float:
        w = self.cfg.fusion_weight
        return float(self.dense_meta.fusion_weight if w is None else w)

    def set_active(self, ad_ids: Sequence[str], active: bool) -> int:
        """Switch ads on/off in place (table and trie); returns how many changed."""
        return self.trie.set_active(list(ad_ids), active)

    # --- decoding -----------------------------------------------------------------------

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The left-padded batch of ``prompts`` rendered as in training (chat template)."""
        from leadre.model.factory import render_prompts

        enc = self.tokenizer(render_prompts(self.tokenizer, prompts), padding=True,
                             truncation=True, max_length=self.cfg.max_prompt_tokens,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].to(self.device)}

    def generate_rows(self, prompts: list[str], beam_size: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, scores)`` of shape ``(len(prompts), beams)``: SID-table rows (-1 = none)
        and log-probs, best first. Batches of ``cfg.batch_size``, input order preserved."""
        rows, scores, _ = self.decode(prompts, beam_size)
        return rows, scores

    def decode(self, prompts: list[str], beam_size: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """:meth:`generate_rows` plus, with a dense head, each prompt's user vector (unit,
        in the encoder's space), from the same forward pass."""
        beam = beam_size or self.cfg.beam_size
        n = len(prompts)
        width = min(beam, int(self.trie.active_count[0]) if self.trie.n_nodes else 0)
        rows = np.full((n, width), -1, np.int64)
        scores = np.full((n, width), -np.inf, np.float32)
        users = None if self.head is None else np.zeros((n, self.dense_meta.dim), np.float32)
        if n == 0 or width == 0:
            return rows, scores, users
        batches = [np.arange(i, min(i + self.cfg.batch_size, n))
                   for i in range(0, n, self.cfg.batch_size)]
        if self.cfg.sort_by_length and n > 1:
            # the template adds the same tokens to every prompt: raw lengths order the same
            lengths = np.minimum([len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]],
                                 self.cfg.max_prompt_tokens)
            order = np.argsort(lengths, kind="stable")
            cap = self.cfg.max_batch_tokens
            if cap is None:
                cap = 32768 if self.device.type == "cpu" else 0
            batches = [order[b] for b in length_buckets(lengths[order], self.cfg.batch_size,
                                                        self.cfg.bucket_slack, cap, beam)]
        for idx in batches:
            enc = self.encode([prompts[i] for i in idx])
            r, s = constrained_beam_search(self.model, enc["input_ids"], enc["attention_mask"],
                                           self.trie, beam)
            rows[idx, :r.shape[1]] = r
            scores[idx, :s.shape[1]] = s
            if self._capture is not None:  # the prompt pass's state at the last prompt token
                with torch.inference_mode():
                    u = self.head(self._capture.pop()[:, -1].float())
                users[idx] = u.float().cpu().numpy()
        return rows, scores, users

    def dense_top(self, users: np.ndarray, m: int, dense_lp: np.ndarray | None = None
                  ) -> np.ndarray:
        """Table rows of the ``m`` active ads nearest each user vector (-1 padded): the ScaNN
        index when one is set, else the best of :meth:`dense_log_probs` (``dense_lp`` when
        the caller has them: the same scores, not computed twice)."""
        out = np.full((len(users), m), -1, np.int64)
        if m == 0 or not len(users):
            return out
        if self.index is not None:
            found, _ = self.index.search_rows(users, m + 8)  # a few spare for inactive ones
            rows = np.where(found >= 0, self._index_rows[np.maximum(found, 0)], -1)
            rows = np.where((rows >= 0) & self.table.active[np.maximum(rows, 0)], rows, -1)
            for i, r in enumerate(rows):
                r = r[r >= 0][:m]
                out[i, :len(r)] = r
            return out
        from leadre.sids.ann import top_columns

        m = min(m, int(self.table.active.sum()))  # inactive rows score -inf: never picked
        if m == 0:
            return out
        out[:, :m] = top_columns(self.dense_log_probs(users) if dense_lp is None else dense_lp,
                                 m)
        return out

    def rank(self, beam_rows: np.ndarray, beam_scores: np.ndarray, users: np.ndarray | None,
             k: int, weight: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The final top ``k`` from :meth:`decode`'s output: fused when the model has a dense
        head and ``cfg.ranking`` is ``fused`` (``weight``: default :attr:`fusion_weight`),
        else the beam's."""
        if not self.fused or users is None:
            return beam_rows[:, :k], beam_scores[:, :k]
        from leadre.model.dense import fuse

        dense_lp = self.dense_log_probs(users)
        return fuse(beam_rows, beam_scores,
                    self.dense_top(users, self.cfg.dense_candidates, dense_lp), dense_lp,
                    self.unseen,
                    self.fusion_weight if weight is None else weight, k,
                    self.dense_meta.unseen_calibration)

    def dense_log_probs(self, users: np.ndarray) -> np.ndarray:
        """The dense head's log-probability of every table row (inactive: -inf)."""
        from leadre.model.dense import dense_log_probs

        return dense_log_probs(users, self.vectors, self.table.active,
                               self.dense_meta.temperature)

    def generate(self, prompts: list[str], k: int | None = None) -> list[list[Candidate]]:
        """Top-``k`` (default ``cfg.top_k``) distinct active ads per prompt, best first."""
        k = k or self.cfg.top_k
        reach = self.cfg.reach() if self.fused else self.cfg.beam_size
        if k > reach:
            raise ValueError(f"k={k} > {reach} candidates (beam_size={self.cfg.beam_size}"
                             + (f" + dense_candidates={self.cfg.dense_candidates})"
                                if self.fused else ")"))
        return self.candidates(*self.rank(*self.decode(prompts), k))

    def candidates(self, rows: np.ndarray, scores: np.ndarray) -> list[list[Candidate]]:
        """:class:`Candidate` lists from (rows, scores) as :meth:`rank` returns them."""
        out: list[list[Candidate]] = []
        for r, s in zip(rows, scores):
            cands = []
            for row, score in zip(r, s):
                if row < 0:
                    break
                cands.append(Candidate(str(self.table.ad_id_array[row]),
                                       format_sid(self.table.codes[row], self.table.prefixes),
                                       float(score)))
            out.append(cands)
        return out

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def from_stage_dir(cls, model_dir: str, sids_dir: str,
                       cfg: GenerationConfig | None = None) -> "SidGenerator":
        """Load a trained model (an ``sft``/``dpo`` stage dir, or any HF model dir) and the
        S-ID table of a ``sids`` stage dir."""
        from leadre.artifacts import check_model
        from leadre.sids.build import load_table
        from leadre.model.factory import load_trained

        table = load_table(sids_dir)
        check_model(model_dir, table.version, sids_dir)
        dense = load_dense(model_dir, sids_dir)
        model, tokenizer = load_trained(model_dir)
        if dense is None:
            return cls(model, tokenizer, table, cfg)
        from leadre.model.dense import find, load_trained_ads

        return cls(model, tokenizer, table, cfg, dense=dense,
                   vectors=table_vectors(table, sids_dir),
                   trained_ads=load_trained_ads(find(model_dir)))


def table_vectors(table: SidTable, sids_dir: str) -> np.ndarray:
    """Unit encoder vectors aligned with ``table``'s rows (zeros for an ad without one)."""
    from leadre.sids.ann import load_embeddings

    ids, emb = load_embeddings(sids_dir)
    out = np.zeros((len(table), emb.shape[1]), np.float32)
    rows = table.rows_of(ids)
    ok = rows >= 0
    out[rows[ok]] = emb[ok]
    return out


def load_dense(model_dir: str, sids_dir: str) -> tuple[Any, Any] | None:
    """The dense head saved with ``model_dir`` (None without one), checked against the
    encoder of ``sids_dir``'s vectors."""
    from leadre.artifacts import read_manifest
    from leadre.model import dense

    where = dense.find(model_dir)
    if where is None:
        return None
    head, meta = dense.load_head(where)
    dense.check_encoder(meta, read_manifest(sids_dir).get("encoder_version"), str(model_dir),
                        sids_dir)
    return head, meta


# --- the common approach, kept as the reference and the benchmark baseline ----------------

@torch.inference_mode()
def hf_constrained_generate(model: Any, tokenizer: Any, trie: SidTrie, prompts: list[str],
                            beam_size: int, max_prompt_tokens: int = 1024
                            ) -> tuple[np.ndarray, np.ndarray]:
    """The same search with ``model.generate(num_beams=..., prefix_allowed_tokens_fn=...)``:
    ``(rows, scores)`` like :func:`constrained_beam_search`. Slow; for tests and benchmarks."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    from leadre.model.factory import render_prompts

    enc = tokenizer(render_prompts(tokenizer, prompts), padding=True, truncation=True,
                    max_length=max_prompt_tokens, return_tensors="pt").to(device)
    prompt_len = enc["input_ids"].shape[1]
    fallback = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]
    memo: dict[tuple[int, ...], list[int]] = {}  # prefix -> allowed ids (a fair, fast callback)

    def allowed(_batch_id: int, ids: torch.Tensor) -> list[int]:
        prefix = tuple(ids[prompt_len:].tolist())
        nxt = memo.get(prefix)
        if nxt is None:
            nxt = trie.allowed(trie.walk([prefix]))[0].tolist() or fallback
            memo[prefix] = nxt
        return nxt

    n_active = int(trie.active_count[0])
    width = min(beam_size, n_active)
    out = model.generate(**enc, num_beams=width, num_return_sequences=width,
                         max_new_tokens=trie.depth, min_new_tokens=trie.depth,
                         prefix_allowed_tokens_fn=allowed, length_penalty=0.0,
                         early_stopping=True, do_sample=False, return_dict_in_generate=True,
                         output_scores=True, pad_token_id=tokenizer.pad_token_id)
    seqs = out.sequences[:, prompt_len:prompt_len + trie.depth].cpu().numpy()
    rows = trie.rows(trie.walk(seqs.tolist())).reshape(len(prompts), width)
    scores = out.sequences_scores.float().cpu().numpy().reshape(len(prompts), width)
    return rows, scores
