"""Baselines evaluated on exactly the LLM's split: most-popular, SASRec (cross-entropy over all
items), an embedding-ANN retriever and random. Each recommends only *active* ads, like the trie.

    pop = MostPopular(active_ids).fit(train_sequences)
    recs = pop.recommend(histories, k=10)

``train_sequences`` are per-user ad-id sequences (oldest first) that end before any
evaluation target; ``histories`` are the eval rows' full ``sequence_ad_ids``. :data:`BASELINES` maps
each name ``leadre eval`` accepts to the factory that builds and fits that baseline.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from leadre.artifacts import exists, join
from leadre.eval.metrics import ranking_metrics
from leadre.sids.ann import AnnConfig, build, choose_mode, load_embeddings

log = logging.getLogger(__name__)


class Recommender:
    name = "base"

    def fit(self, sequences: Sequence[Sequence[str]], **_: Any) -> "Recommender":
        return self

    def recommend(self, histories: Sequence[Sequence[str]], k: int) -> list[list[str]]:
        raise NotImplementedError


class RandomRec(Recommender):
    """Uniformly random active ads (the floor every method must beat)."""

    name = "random"

    def __init__(self, active_ids: Sequence[str], seed: int = 0):
        self.ids = np.asarray(list(active_ids), dtype=object)
        self.rng = np.random.default_rng(seed)

    def recommend(self, histories, k):
        k = min(k, len(self.ids))
        return [self.ids[self.rng.choice(len(self.ids), k, replace=False)].tolist()
                for _ in histories]


class MostPopular(Recommender):
    """The most engaged-with active ads in the training sequences, same list for everyone."""

    name = "most_popular"

    def __init__(self, active_ids: Sequence[str]):
        self.active = list(active_ids)
        self.top: list[str] = []

    def fit(self, sequences, **_):
        counts = Counter(a for s in sequences for a in s)
        self.top = sorted(self.active, key=lambda a: (-counts.get(a, 0), a))
        return self

    def recommend(self, histories, k):
        return [self.top[:k] for _ in histories]


# --- SASRec ---------------------------------------------------------------------------------

@dataclass
class SasrecConfig:
    """SASRec (Kang & McAuley 2018) trained with full softmax cross-entropy over all items at
    every position (the variant that matches or beats many generative retrievers).

    Early stopping on validation NDCG@10 every epoch; the best epoch's weights are kept.
    """

    dim: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.3
    max_len: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 200
    patience: int = 10
    max_minutes: float = 20.0
    seed: int = 0


class _SasrecNet(nn.Module):
    """SASRec's encoder. With ``text`` ((n_items + 1, d) frozen item vectors, row 0 padding),
    an item's representation is its ID embedding plus a trained projection of its text vector
    (UniSRec, Hou et al. 2022): items that share words share representation, and an item seen
    rarely in training still has one."""

    def __init__(self, n_items: int, c: SasrecConfig, text: torch.Tensor | None = None):
        super().__init__()
        self.item = nn.Embedding(n_items + 1, c.dim, padding_idx=0)
        self.proj = None
        if text is not None:
            self.register_buffer("text", text.float())
            self.proj = nn.Linear(text.shape[1], c.dim, bias=False)
        self.pos = nn.Embedding(c.max_len, c.dim)
        layer = nn.TransformerEncoderLayer(c.dim, c.heads, dim_feedforward=c.dim * 2,
                                           dropout=c.dropout, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.enc = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.dim)
        self.drop = nn.Dropout(c.dropout)
        self.scale = math.sqrt(c.dim)
        nn.init.normal_(self.item.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded item indices -> (B, L, dim). Causal attention only: padding
        sits after the real items, so no real position ever sees it."""
        L = seq.shape[1]
        h = self.embed(seq) * self.scale + self.pos(torch.arange(L, device=seq.device))
        causal = torch.triu(torch.full((L, L), float("-inf"), device=seq.device), 1)
        return self.norm(self.enc(self.drop(h), mask=causal, is_causal=True))

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        """Item representations of ``seq`` (any shape of item indices)."""
        e = self.item(seq)
        return e if self.proj is None else e + self.proj(self.text[seq])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        table = self.item.weight if self.proj is None else self.item.weight + self.proj(self.text)
        out = h @ table.T
        out[..., 0] = float("-inf")
        return out


class SASRec(Recommender):
    """ID-only SASRec; with ``text`` (ad ids, (n, d) frozen vectors: the S-ID stage's
    embeddings) the text-aware variant, whose item representation adds a trained projection
    of each item's vector (items without one get zeros)."""

    name = "sasrec"

    def __init__(self, item_ids: Sequence[str], active_ids: Sequence[str],
                 cfg: SasrecConfig | None = None, device: str = "cpu",
                 text: tuple[Sequence[str], np.ndarray] | None = None):
        self.cfg = cfg or SasrecConfig()
        self.items = list(item_ids)
        self.index = {a: i + 1 for i, a in enumerate(self.items)}  # 0 = padding
        self.text = None
        if text is not None:
            self.name = "text_sasrec"
            ids, vecs = text
            self.text = torch.zeros(len(self.items) + 1, vecs.shape[1])
            rows = [(self.index[a], i) for i, a in enumerate(ids) if a in self.index]
            if rows:
                mine, theirs = map(list, zip(*rows))
                self.text[mine] = torch.as_tensor(np.asarray(vecs)[theirs], dtype=torch.float32)
        self.active_mask = torch.zeros(len(self.items) + 1, dtype=torch.bool)
        self.active_mask[[self.index[a] for a in active_ids if a in self.index]] = True
        self.device = torch.device(device)
        self.net: _SasrecNet | None = None
        self.history: list[dict[str, float]] = []

    def _encode(self, seqs: Sequence[Sequence[str]], length: int) -> torch.Tensor:
        """Last ``length`` known items of each sequence, right-padded."""
        out = torch.zeros(len(seqs), length, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids = [self.index[a] for a in s if a in self.index][-length:]
            if ids:
                out[i, :len(ids)] = torch.tensor(ids)
        return out

    def fit(self, sequences, valid: tuple[Sequence[Sequence[str]], Sequence[str]] | None = None,
            **_):
        c = self.cfg
        torch.manual_seed(c.seed)
        rng = np.random.default_rng(c.seed)
        seqs = [s for s in sequences if sum(a in self.index for a in s) >= 2]
        data = self._encode(seqs, c.max_len + 1)
        inputs, labels = data[:, :-1], data[:, 1:]
        # Sequences shorter than max_len + 1 are right-padded, so labels past the end are 0.
        self.net = _SasrecNet(len(self.items), c, self.text).to(self.device)
        opt = torch.optim.AdamW(self.net.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        best, best_state, bad, t0 = -1.0, None, 0, time.perf_counter()
        for epoch in range(c.epochs):
            self.net.train()
            perm = rng.permutation(len(inputs))
            total, n = 0.0, 0
            for start in range(0, len(perm), c.batch_size):
                idx = torch.from_numpy(perm[start:start + c.batch_size])
                x, y = inputs[idx].to(self.device), labels[idx].to(self.device)
                width = int((x != 0).sum(1).max())
                x, y = x[:, :width], y[:, :width]
                logits = self.net.logits(self.net(x))
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   y.reshape(-1), ignore_index=0)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                n += len(idx)
            rec = {"epoch": epoch, "loss": total / max(n, 1)}
            if valid is not None and len(valid[0]):
                recs = self.recommend(valid[0], 10)
                rec["valid_ndcg@10"] = ranking_metrics(recs, valid[1], ks=(10,))["ndcg@10"]
                if rec["valid_ndcg@10"] > best:
                    best, bad = rec["valid_ndcg@10"], 0
                    best_state = copy.deepcopy(self.net.state_dict())
                else:
                    bad += 1
            self.history.append(rec)
            log.debug("sasrec %s", rec)
            if bad >= c.patience or (time.perf_counter() - t0) > c.max_minutes * 60:
                break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.best_valid_ndcg10 = best
        return self

    @torch.inference_mode()
    def recommend(self, histories, k, batch_size: int = 512):
        assert self.net is not None, "fit() first"
        self.net.eval()
        mask = self.active_mask.to(self.device)
        out: list[list[str]] = []
        k = min(k, int(mask.sum()))
        for start in range(0, len(histories), batch_size):
            x = self._encode(histories[start:start + batch_size], self.cfg.max_len).to(self.device)
            lengths = (x != 0).sum(1)
            h = self.net(x)
            last = h[torch.arange(len(x)), (lengths - 1).clamp(min=0)]
            scores = self.net.logits(last)
            scores = scores.masked_fill(~mask, float("-inf"))
            # Users with no known history: no signal; scores of an all-padding input.
            top = scores.topk(k, dim=1).indices.cpu().numpy()
            out.extend([[self.items[j - 1] for j in row] for row in top])
        return out


def tune_sasrec(item_ids, active_ids, sequences, valid, grid: Sequence[Mapping[str, Any]],
                base: SasrecConfig | None = None, device: str = "cpu",
                text: tuple[Sequence[str], np.ndarray] | None = None
                ) -> tuple[SASRec, list[dict[str, Any]]]:
    """Fit one SASRec (text-aware with ``text``) per grid point (overrides of ``base``); keep
    the best on validation NDCG@10. Returns the best model and one record per grid point."""
    base = base or SasrecConfig()
    best, records = None, []
    for point in (grid or [{}]):
        cfg = SasrecConfig(**{**asdict(base), **dict(point)})
        t0 = time.perf_counter()
        model = SASRec(item_ids, active_ids, cfg, device, text).fit(sequences, valid=valid)
        records.append({**dict(point), "valid_ndcg@10": model.best_valid_ndcg10,
                        "epochs": len(model.history), "seconds": time.perf_counter() - t0})
        if best is None or model.best_valid_ndcg10 > best.best_valid_ndcg10:
            best = model
    return best, records


# --- embedding ANN ----------------------------------------------------------------------------

class EmbeddingANN(Recommender):
    """User vector = mean of the (L2-normalised) embeddings of the history ads; recommend the
    nearest active ads by inner product, searched the way ``leadre index`` searches: ``index``
    (default ``AnnConfig()``) picks the mode by the number of active ads (exact NumPy where
    ScaNN would brute-force, ScaNN above) and ScaNN's query knobs are tuned to its
    ``min_recall``. Users without embedded history get the most popular ads."""

    name = "embedding_ann"

    def __init__(self, embeddings: Mapping[str, np.ndarray] | tuple[Sequence[str], np.ndarray],
                 active_ids: Sequence[str], index: AnnConfig | None = None):
        ids, vecs = (list(embeddings[0]), np.asarray(embeddings[1], np.float32)) \
            if isinstance(embeddings, tuple) else (list(embeddings), np.stack(list(embeddings.values())))
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        self.row = {a: i for i, a in enumerate(ids)}
        self.vecs = vecs.astype(np.float32)
        act = [a for a in active_ids if a in self.row]
        self.active_ids = np.asarray(act, dtype=object)
        self.db = self.vecs[[self.row[a] for a in act]] if act else np.zeros((0, vecs.shape[1]), np.float32)
        self.index = index or AnnConfig()
        self.searcher = None
        self.query_params: dict[str, Any] = {}
        self.fallback: list[str] = act

    def fit(self, sequences, **_):
        self.fallback = MostPopular(self.active_ids.tolist()).fit(sequences).top
        if len(self.db) and choose_mode(len(self.db), self.index.mode) != "brute_force":
            self.searcher, info = build(self.db, self.index)
            self.query_params = info["query_params"]
        return self

    def user_vectors(self, histories) -> tuple[np.ndarray, np.ndarray]:
        q = np.zeros((len(histories), self.vecs.shape[1]), np.float32)
        has = np.zeros(len(histories), bool)
        for i, h in enumerate(histories):
            rows = [self.row[a] for a in h if a in self.row]
            if rows:
                q[i] = self.vecs[rows].mean(0)
                has[i] = True
        return q, has

    def recommend(self, histories, k):
        k = min(k, len(self.db))
        q, has = self.user_vectors(histories)
        if self.searcher is not None:
            idx, _ = self.searcher.search_batched(q, final_num_neighbors=k, **self.query_params)
            idx = np.asarray(idx)
        else:
            idx = np.empty((len(q), k), np.int64)
            for s in range(0, len(q), 1024):
                sc = q[s:s + 1024] @ self.db.T
                part = np.argpartition(-sc, k - 1, axis=1)[:, :k]
                order = np.argsort(-np.take_along_axis(sc, part, 1), axis=1, kind="stable")
                idx[s:s + 1024] = np.take_along_axis(part, order, 1)
        return [self.active_ids[r].tolist() if h else self.fallback[:k] for r, h in zip(idx, has)]


# --- registry ---------------------------------------------------------------------------------

@dataclass
class BaselineInputs:
    """Everything a baseline factory may train on; every baseline gets the same.

    item_ids: every ad of the S-ID table (SASRec's vocabulary).
    active_ids: the ads a baseline may recommend.
    sequences: per-user training sequences of ad ids, oldest first.
    valid: (histories, targets) of the early-stopping rows; None = no early stopping.
    fit_sequences: what a baseline that early-stops on ``valid`` trains on (None: ``sequences``);
        differs when ``valid``'s targets are the sequences' last items, held out of training.
    sids_dir: the S-ID stage directory (its ``embeddings`` feed the embedding-ANN baseline
        and the text-aware SASRec).
    seed: seed of the random baseline and of ``leadre index``'s recall check.
    device: torch device for SASRec.
    sasrec / sasrec_grid: SASRec's base config and the override sets tried on ``valid``.
    """

    item_ids: list[str]
    active_ids: list[str]
    sequences: list[list[str]]
    sids_dir: str
    valid: tuple[list[list[str]], list[str]] | None = None
    fit_sequences: list[list[str]] | None = None
    seed: int = 0
    device: str = "cpu"
    sasrec: SasrecConfig = field(default_factory=SasrecConfig)
    sasrec_grid: list[dict[str, Any]] = field(default_factory=list)


# A factory returns the fitted baseline (None: not applicable to these inputs) and the facts
# about it that the eval report records (empty: nothing to record).
Factory = Callable[[BaselineInputs], tuple[Recommender | None, dict[str, Any]]]


def _random(x: BaselineInputs) -> tuple[Recommender, dict[str, Any]]:
    return RandomRec(x.active_ids, x.seed), {}


def _most_popular(x: BaselineInputs) -> tuple[Recommender, dict[str, Any]]:
    return MostPopular(x.active_ids).fit(x.sequences), {}


def _embedding_ann(x: BaselineInputs) -> tuple[Recommender | None, dict[str, Any]]:
    if not exists(join(x.sids_dir, "embeddings")):
        return None, {"skipped": f"{x.sids_dir} has no embeddings (bring-your-own S-IDs)"}
    ids, vecs = load_embeddings(x.sids_dir)
    model = EmbeddingANN((ids.tolist(), vecs), x.active_ids, AnnConfig(seed=x.seed))
    model.fit(x.sequences)
    return model, {"index": "scann" if model.searcher is not None else "exact"}


def _sasrec(x: BaselineInputs, text: tuple[Sequence[str], np.ndarray] | None = None
            ) -> tuple[Recommender, dict[str, Any]]:
    fit = x.sequences if x.fit_sequences is None else x.fit_sequences
    model, records = tune_sasrec(x.item_ids, x.active_ids, fit, x.valid, x.sasrec_grid,
                                 x.sasrec, x.device, text)
    return model, {"config": asdict(model.cfg), "grid": records, "epochs": len(model.history),
                   "best_valid_ndcg@10": model.best_valid_ndcg10}


def _text_sasrec(x: BaselineInputs) -> tuple[Recommender | None, dict[str, Any]]:
    """SASRec whose items also carry the S-ID stage's frozen text vectors (same config, grid
    and early stopping as the ID-only one)."""
    if not exists(join(x.sids_dir, "embeddings")):
        return None, {"skipped": f"{x.sids_dir} has no embeddings (bring-your-own S-IDs)"}
    ids, vecs = load_embeddings(x.sids_dir)
    model, info = _sasrec(x, (ids.tolist(), vecs))
    return model, {**info, "text_dim": int(vecs.shape[1])}


BASELINES: dict[str, Factory] = {"most_popular": _most_popular, "sasrec": _sasrec,
                                 "text_sasrec": _text_sasrec, "embedding_ann": _embedding_ann,
                                 "random": _random}
