"""Content titles (short videos, news) in the ads' vector space, and their semantic codes.

The S-ID stage encodes every distinct content title of the ingested events with the same
frozen encoder as the ads and writes them as ``<sids>/titles`` (title, embedding, codes,
fallback). A title's *code* is its vector quantised by the ads' trained quantiser: the first
levels of an S-ID-like path (``<a_3><b_9>``), made of the very tokens the ads' S-IDs use. A
prompt that shows a watched video as its code gives the model the video's meaning in the
tokens it must learn anyway (knowledge tokens; issue 23), instead of words it would have to
learn from scratch.

Unusable titles never stop the stage: an empty, over-long or undecodable title gets the
*fallback vector*, the unit-length mean of the ad embeddings (the catalog's centre: "no
information"), and is counted by reason in the manifest. Serving codes titles it has never
seen with :meth:`ContentCodes.add_unseen` (the generator tier is latency-tolerant).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from leadre.artifacts import exists, join, read_manifest, read_table
from leadre.sids.table import format_sid

if TYPE_CHECKING:
    from leadre.sids.encoder import TextEncoder
    from leadre.sids.quantize import Quantizer

TITLES = "titles"
FALLBACK_REASONS = ("empty", "too_long", "undecodable")


def title_problem(title: str | None, max_chars: int) -> str | None:
    """Why ``title`` cannot be encoded (one of :data:`FALLBACK_REASONS`), or None."""
    if title is None or not title.strip():
        return "empty"
    if len(title) > max_chars:
        return "too_long"
    # Arrow strings are valid UTF-8; bytes that were not arrive as U+FFFD replacement
    # characters (or lone surrogates from a lenient JSON reader).
    if "\ufffd" in title or any("\ud800" <= ch <= "\udfff" for ch in title):
        return "undecodable"
    return None


def fallback_vector(ad_embeddings: np.ndarray) -> np.ndarray:
    """The vector of an unusable title: the unit-length mean of the ad embeddings."""
    centre = np.asarray(ad_embeddings, np.float64).mean(0)
    norm = np.linalg.norm(centre)
    return (centre / norm if norm > 1e-12 else centre).astype(np.float32)


def content_titles(ingest_dir: str) -> list[str | None]:
    """The distinct titles of the ingested content (non-ad) events, nulls included once
    (none when the ingest holds no events table: a catalog alone)."""
    if not exists(join(ingest_dir, "events")):
        return []
    events = read_table(ingest_dir, "events", columns=["domain", "title"])
    content = events.filter(pc.not_equal(events.column("domain"), "ad"))
    return pc.unique(content.column("title")).to_pylist()


def titles_table(titles: Sequence[str | None], emb: np.ndarray, codes: np.ndarray,
                 reasons: Sequence[str | None]) -> pa.Table:
    return pa.table({
        "title": pa.array(list(titles), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(np.asarray(emb, np.float32).ravel(), pa.float32()), emb.shape[1]),
        "codes": pa.array([list(map(int, c)) for c in codes], pa.list_(pa.int32())),
        "fallback": pa.array(list(reasons), pa.string()),
    })


class ContentCodes:
    """title -> its semantic code (the first ``levels`` S-ID tokens of its vector). Plain
    dictionaries, cheap to pickle into Ray workers; :meth:`attach` adds the encoder and
    quantiser that code titles never seen at build time."""

    def __init__(self, codes: dict[str, list[int]], prefixes: Sequence[str], levels: int,
                 max_chars: int = 512):
        self.codes, self.prefixes, self.levels = codes, list(prefixes), levels
        self.max_chars = max_chars
        self._strings: dict[str, str] = {}
        self._encoder: "TextEncoder | None" = None
        self._quantizer: "Quantizer | None" = None
        self._fallback: np.ndarray | None = None

    @classmethod
    def from_sids_dir(cls, sids_dir: str, levels: int, prefixes: Sequence[str],
                      max_chars: int = 512) -> "ContentCodes | None":
        """The codes of ``<sids_dir>/titles``; empty where the stage encoded titles but the
        events had none (a catalog of ads only, e.g. Scientific); None where it encoded none
        (bring-your-own S-IDs have no encoder or quantiser; ``titles=false``)."""
        if not exists(join(sids_dir, TITLES)):
            coded = (read_manifest(sids_dir).get("quality") or {}).get("titles") is not None
            return cls({}, prefixes, levels, max_chars) if coded else None
        t = read_table(sids_dir, TITLES, columns=["title", "codes"])
        titles, codes = t.column("title").to_pylist(), t.column("codes").to_pylist()
        return cls({k: v for k, v in zip(titles, codes) if k is not None}, prefixes, levels,
                   max_chars)

    def code(self, title: str | None) -> str | None:
        """The code string of ``title`` (``<a_3><b_9>``), None when the title is unknown."""
        if title is None:
            return None
        s = self._strings.get(title)
        if s is None:
            c = self.codes.get(title)
            if c is None:
                return None
            s = self._strings[title] = format_sid(c[:self.levels], self.prefixes)
        return s

    def attach(self, sids_dir: str) -> "ContentCodes":
        """Load the stage's encoder and quantiser, so :meth:`add_unseen` can code new titles."""
        from leadre.sids.ann import load_embeddings
        from leadre.sids.encoder import load_encoder
        from leadre.sids.quantize import load_quantizer

        self._encoder = load_encoder(join(sids_dir, "encoder"), device="cpu")
        self._quantizer = load_quantizer(sids_dir, device="cpu")
        self._fallback = fallback_vector(load_embeddings(sids_dir)[1])
        return self

    def unseen(self, titles: Sequence[str | None]) -> list[str]:
        return [t for t in dict.fromkeys(titles) if t and t not in self.codes]

    def add_unseen(self, titles: Sequence[str | None]) -> int:
        """Encode and quantise the titles without a code; returns how many were added."""
        new = self.unseen(titles)
        if not new:
            return 0
        if self._encoder is None:
            raise RuntimeError("ContentCodes.add_unseen before attach(sids_dir)")
        emb, _ = encode_titles(new, self._encoder.encode, self._fallback, self.max_chars)
        for t, c in zip(new, self._quantizer.encode(emb)):
            self.codes[t] = [int(x) for x in c]
        return len(new)


def encode_titles(titles: Sequence[str | None], encode, fallback: np.ndarray, max_chars: int
                  ) -> tuple[np.ndarray, list[str | None]]:
    """(vectors, fallback reasons) of ``titles``: usable titles through ``encode`` (texts ->
    unit vectors), the rest get ``fallback``."""
    reasons = [title_problem(t, max_chars) for t in titles]
    good = [t for t, r in zip(titles, reasons) if r is None]
    return with_fallback(reasons, encode(good) if good else None, fallback), reasons


def with_fallback(reasons: Sequence[str | None], good: np.ndarray | None, fallback: np.ndarray
                  ) -> np.ndarray:
    """One vector per title: the rows of ``good`` in order where ``reasons`` is None, the
    fallback vector elsewhere."""
    emb = np.tile(np.asarray(fallback, np.float32), (len(reasons), 1))
    ok = [i for i, r in enumerate(reasons) if r is None]
    if ok:
        emb[ok] = good
    return emb
