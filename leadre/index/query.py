"""Behaviour events -> one query vector in the ads' embedding space: how the serving matcher
turns a user's history into a real-time ANN query, and therefore also how the index stage
and ``bench/bench_matcher.py`` build the queries they tune and measure recall on.

Ad events use the ad's own embedding (inactive ads too: the user's interest is real even if
that ad is switched off); content events (videos, news) embed their title with the catalog's
text encoder, so cross-domain behaviour moves the query as well. Each event is weighted by
its action and by recency (most recent first).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

# How much each behaviour says about the next ad (impressions are mostly targeting noise).
ACTION_WEIGHT = {"conversion": 3.0, "click": 2.0, "impression": 0.3, "play": 1.0, "read": 1.0}
RECENCY_DECAY = 0.85  # per position, most recent first


class QueryBuilder:
    """Events -> unit query vector. Built from a sids directory (:meth:`from_sids_dir`, with
    the catalog's text encoder for content titles) or from arrays (:meth:`from_arrays`, ad
    events only)."""

    def __init__(self, ad_ids: Sequence[str], emb: np.ndarray, sids_dir: str | None = None,
                 cache_titles: int = 50_000):
        self.emb = np.asarray(emb, np.float32)
        # A dict, not a pandas Index: one lookup per event is ~0.1 us here and ~100 us there.
        self._row = {a: i for i, a in enumerate(ad_ids)}
        self.sids_dir = sids_dir
        self._encoder = None
        self._titles: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_titles = cache_titles

    @classmethod
    def from_sids_dir(cls, sids_dir: str, cache_titles: int = 50_000) -> "QueryBuilder":
        """With the catalog's text encoder loaded and run once now: loading it lazily would
        stall the first request that carries a title (imports, weights) by a second or more."""
        from leadre.sids.ann import load_embeddings

        ids, emb = load_embeddings(sids_dir)
        qb = cls(ids.tolist(), emb, sids_dir, cache_titles)
        qb._load_encoder().encode(["warm-up"])
        return qb

    def _load_encoder(self):
        if self._encoder is None:
            from leadre.artifacts import join
            from leadre.sids.encoder import load_encoder

            self._encoder = load_encoder(join(self.sids_dir, "encoder"))
        return self._encoder

    def with_embeddings(self, ad_ids: Sequence[str], emb: np.ndarray) -> "QueryBuilder":
        """This builder (its loaded encoder, its title cache) over another set of ad vectors:
        the catalog grew (``leadre add-ads``)."""
        qb = type(self)(list(ad_ids), emb, self.sids_dir, self._cache_titles)
        qb._encoder, qb._titles = self._encoder, self._titles
        return qb

    @classmethod
    def from_arrays(cls, ad_ids: Sequence[str], emb: np.ndarray) -> "QueryBuilder":
        return cls(list(ad_ids), emb)

    @property
    def dim(self) -> int:
        return self.emb.shape[1]

    def _encode_titles(self, titles: list[str]) -> list[np.ndarray]:
        missing = [t for t in dict.fromkeys(titles) if t not in self._titles]
        if missing:
            if self.sids_dir is None:
                return [np.zeros(self.dim, np.float32) for _ in titles]
            for t, v in zip(missing, self._load_encoder().encode(missing)):
                self._titles[t] = v.astype(np.float32)
            while len(self._titles) > self._cache_titles:
                self._titles.popitem(last=False)
        return [self._titles[t] for t in titles]

    def needs_encoding(self, events: Sequence[dict]) -> bool:
        """Whether :meth:`vector` of ``events`` would run the text encoder: a content title
        that is not in the cache (milliseconds of CPU for MiniLM, so a caller on an event loop
        moves that call to a thread)."""
        return self.sids_dir is not None and any(
            ev.get("title") and self._row.get(ev.get("ad_id")) is None
            and ev["title"] not in self._titles for ev in events)

    def ad_vectors(self, ad_ids: Sequence[str]) -> np.ndarray:
        rows = [r for r in map(self._row.get, ad_ids) if r is not None]
        return self.emb[rows]

    def vector(self, events: Sequence[dict]) -> np.ndarray | None:
        """Weighted mean of the events' vectors, unit length; None when nothing is usable."""
        rows, weights, titles, title_w = [], [], [], []
        n = len(events)
        for i, ev in enumerate(events):
            w = ACTION_WEIGHT.get(ev.get("action"), 0.5) * RECENCY_DECAY ** (n - 1 - i)
            ad = ev.get("ad_id")
            r = self._row.get(ad) if ad else None
            if r is not None:
                rows.append(r)
                weights.append(w)
            elif ev.get("title"):
                titles.append(ev["title"])
                title_w.append(w)
        vecs = [self.emb[rows]] if rows else []
        if titles:
            for v, w in zip(self._encode_titles(titles), title_w):
                if np.any(v):
                    vecs.append(v[None])
                    weights.append(w)
        if not vecs:
            return None
        q = np.asarray(weights, np.float32) @ np.concatenate(vecs)
        norm = np.linalg.norm(q)
        return (q / norm).astype(np.float32) if norm > 1e-9 else None
