"""What the latency-sensitive tier computes per request, in-process (the Matcher deployment
wraps it; tests and the benchmark use it directly). It never waits for the LLM.

``MatcherCore.recommend`` = ``lookup`` (the store reads: blocking I/O, which the Matcher runs
off its event loop under a deadline) + ``answer`` (no I/O):

1. read the user's generated candidates from the store; if their S-ID version is the one in
   use, map S-IDs -> ads and keep the servable ones (source ``generated``). When the request
   carries events newer than the candidates' basis (*fresh intent*), ``fresh_share`` of the
   answer comes first from a real-time ANN query over those events (source ``fresh``) and the
   user is queued again; candidates of a model other than the one rolled out are served and
   the user is queued ahead of the rest (``priority``);
2. fill up to k with the nearest servable ads around the generated ones (source ``ann``);
3. on a miss (no record, expired, or an older S-ID version) answer from a real-time ScaNN
   query built from the request's ``recent_events`` plus the user's stored history (source
   ``fallback``), or from the popularity list when there is no signal at all, and mark users
   with a stored context for generation (``queued``; the caller writes the queue);
4. when the store is unreachable (:class:`~leadre.serve.store.StoreUnavailable`) or slower
   than the Matcher's deadline, answer as on a miss from the request's ``recent_events``
   alone (cache ``unavailable``): a store outage degrades answers, it fails none.

*Servable* = in the index (active when it was built) and not switched off since: the store's
live ad status (:meth:`MatcherCore.refresh_ad_status`) is applied on top of the index, so a
paused ad disappears from answers without a rebuild.

The index is an immutable ``AdIndex``; a swap builds the new one off the request path and
replaces the reference, so in-flight requests finish on the old index and none fails.
"""

from __future__ import annotations

import logging
import threading
from typing import NamedTuple

from leadre.index.ann import AdIndex
from leadre.index.query import QueryBuilder
from leadre.serve.config import ServePaths
from leadre.index.context import merge_events
from leadre.serve.store import CandidateRecord, StoreUnavailable, open_store

log = logging.getLogger(__name__)


class Lookup(NamedTuple):
    """The store's part of an answer: the user's candidate record, their context (read only
    when there is no usable record) and whether the store answered at all."""

    record: CandidateRecord | None
    context: dict | None
    reachable: bool


UNAVAILABLE = Lookup(None, None, False)


def newer_events(events: list[dict] | None, basis_ts: float) -> list[dict]:
    """The request events newer than the candidates' basis (an event without a time counts
    as new: a client that sends no ``ts`` sends what just happened)."""
    return [e for e in events or [] if e.get("ts") is None or e["ts"] > basis_ts]


class MatcherCore:
    def __init__(self, paths: ServePaths, history_events: int = 20, fresh_share: float = 0.3):
        from leadre.sids import load_table

        if paths.index_dir is None:
            raise ValueError("the matcher needs paths.index_dir")
        self.table = load_table(paths.sids_dir)
        # S-ID -> ad id as a dict: one hash lookup per generated candidate on the hot path.
        self._ad_of_sid = dict(zip(self.table.sids(self.table.ad_id_array.tolist()),
                                   self.table.ad_id_array.tolist()))
        self.queries = QueryBuilder.from_sids_dir(paths.sids_dir)
        self.sids_dir = paths.sids_dir
        self.store = open_store(paths.store_url)
        self.history_events = history_events
        self.fresh_share = fresh_share
        self.model_version: str | None = None  # the model rolled out (store meta); None: any
        self.index_root = paths.index_root
        self.index = self._load(paths.index_dir)
        self.off: frozenset[str] = frozenset()  # ads switched off after the index was built
        self.ad_status_version = 0
        self._swap_lock = threading.Lock()

    # --- index and live ad status -------------------------------------------------------

    def _load(self, index_dir: str) -> AdIndex:
        new = AdIndex.load(index_dir, root=self.index_root)
        if new.sid_version and new.sid_version != self.table.version:
            raise ValueError(f"index {index_dir} was built for S-ID version "
                             f"{new.sid_version}, serving uses {self.table.version}")
        if new.info.get("dim", self.queries.dim) != self.queries.dim:
            raise ValueError(f"index {index_dir} has dim {new.info.get('dim')}, "
                             f"embeddings have {self.queries.dim}")
        return new

    def swap_index(self, index_dir: str, version: str | None = None) -> dict:
        """Load ``index_dir`` and make it current (a no-op when that directory and
        ``version`` are already in use). Raises, keeping the old index, when the directory
        is outside the index root, fails verification or was built for other S-IDs. Build
        each index into a new directory: rewriting the one in use is refused by its hash."""
        with self._swap_lock:
            if self.index.location == index_dir and version in (None, self.index.version):
                return self.index_info()
            new = self._load(index_dir)
            self._follow_catalog(new)
            old, self.index = self.index, new  # atomic reference swap
            log.info("matcher: index %s -> %s (%d ads)", old.version, new.version, len(new))
            return self.index_info()

    def _follow_catalog(self, ix: AdIndex) -> None:
        """An index built after ads were added to the catalog (``leadre add-ads``) covers
        more ads than this replica's S-ID table: reload the table and the ad vectors (same
        S-ID version, existing S-IDs unchanged) before the index goes live."""
        n = ix.info.get("sid_catalog")
        if n is None or n == len(self.table):
            return
        from leadre.sids import load_table
        from leadre.sids.ann import load_embeddings

        table = load_table(self.sids_dir)
        if table.version != self.table.version:
            raise ValueError(f"{self.sids_dir} now holds S-ID version {table.version}, "
                             f"serving uses {self.table.version}")
        queries = self.queries.with_embeddings(*load_embeddings(self.sids_dir))
        ad_of_sid = dict(zip(table.sids(table.ad_id_array.tolist()), table.ad_id_array.tolist()))
        self.queries, self._ad_of_sid, self.table = queries, ad_of_sid, table
        log.info("matcher: catalog now %d ads (S-ID version %s)", len(table), table.version)

    def set_ad_status(self, version: int, off: set[str]) -> bool:
        """Apply a status read from the store (newer versions only); True if it changed."""
        if version <= self.ad_status_version and version != 0:
            return False
        self.off, self.ad_status_version = frozenset(off), version
        return True

    def refresh_ad_status(self, store=None) -> bool:
        """Re-read the live ad status when the store's version moved."""
        store = store or self.store
        if store.ads_status_version() == self.ad_status_version:
            return False
        return self.set_ad_status(*store.inactive_ads())

    def index_info(self) -> dict:
        ix = self.index
        return {"index_version": ix.version, "index_dir": ix.location, "ads": len(ix),
                "mode": ix.info.get("mode"), "sid_version": self.table.version,
                "catalog_ads": len(self.table),
                "ads_switched_off": len(self.off), "ad_status_version": self.ad_status_version}

    # --- requests -----------------------------------------------------------------------

    def lookup(self, user_id: str) -> Lookup:
        """What the store knows of ``user_id``: the candidate record and, when the answer
        will need it (no usable record), the user's context. Blocking I/O: the Matcher runs
        it off the event loop, under a deadline."""
        try:
            rec = self.store.get(user_id)
            ctx = None
            if rec is None or rec.sid_version != self.table.version:
                ctx = self.store.get_user(user_id)
            return Lookup(rec, ctx, True)
        except StoreUnavailable:
            return UNAVAILABLE

    def needs_encoding(self, events: list[dict] | None) -> bool:
        """Whether answering would run the text encoder (a title not in its cache): the
        Matcher then answers off the event loop."""
        return self.queries.needs_encoding(events or [])

    def recommend(self, user_id: str, k: int, recent_events: list[dict] | None = None) -> dict:
        """:meth:`lookup` + :meth:`answer`, in this thread (tests, benchmarks)."""
        return self.answer(user_id, k, recent_events, self.lookup(user_id))

    def answer(self, user_id: str, k: int, recent_events: list[dict] | None,
               found: Lookup) -> dict:
        """The answer from what :meth:`lookup` found (no I/O; the text encoder runs for
        titles it has not seen)."""
        ix, off = self.index, self.off  # one snapshot for the whole request
        rec, ctx, reachable = found
        picked: list[dict] = []
        seen: set[str] = set()

        def add(ad_id: str, score: float, source: str) -> None:
            if ad_id not in seen and ad_id in ix.active and ad_id not in off and len(picked) < k:
                seen.add(ad_id)
                picked.append({"ad_id": ad_id, "score": round(float(score), 6), "source": source})

        cache = "miss" if reachable else "unavailable"
        model_version = None
        fresh: list[dict] = []
        stale_model = False
        if rec is not None and rec.sid_version == self.table.version:
            cache = "hit"
            model_version = rec.model_version
            stale_model = self.model_version is not None and model_version != self.model_version
            fresh = newer_events(recent_events, rec.basis)
            q_fresh = self.queries.vector(fresh) if fresh and self.fresh_share > 0 else None
            if q_fresh is not None:
                # Fresh intent: a share of the answer from what the user just did.
                n_fresh = max(1, round(k * self.fresh_share))
                self._fill(ix, q_fresh, n_fresh, 0, lambda a, s: add(a, s, "fresh"), picked)
            for sid, score in zip(rec.sids, rec.scores):
                ad_id = self._ad_of_sid.get(sid)
                if ad_id is not None:
                    add(ad_id, score, "generated")
        elif rec is not None:
            cache = "stale"

        basis = "generated"
        if len(picked) < k:
            generated = [p["ad_id"] for p in picked if p["source"] == "generated"]
            if cache == "hit" and generated:
                # Expand around what the LLM chose: nearest servable ads to their centroid.
                q = self.queries.ad_vectors(generated).mean(axis=0)
                source = "ann"
            else:
                events = merge_events(recent_events, (ctx or {}).get("events"),
                                      self.history_events)
                q = self.queries.vector(events) if events else None
                basis = ("recent_events" if recent_events else "history") if q is not None \
                    else "popular"
                source = "ann" if cache == "hit" else "fallback"
            if q is not None:
                self._fill(ix, q, k, len(picked), lambda a, s: add(a, s, source), picked)
            if len(picked) < k:  # no signal at all, or a tiny catalog: most popular ads
                for r in ix.popular:
                    add(ix.ad_ids[r], 0.0, source if cache == "hit" else "fallback")
                    if len(picked) >= k:
                        break
        # Only users the store knows: the generator prompts from the stored context, and
        # random ids must not fill the queue. A hit is queued again when the request showed
        # newer events (the Matcher adds them to the stored context first) or when its
        # candidates came from a replaced model (ahead of the rest of the queue).
        queued = (cache != "hit" and ctx is not None) or bool(fresh) or stale_model
        return {"user_id": user_id, "ads": picked, "cache": cache, "basis": basis,
                "queued": queued, "priority": stale_model, "fresh_events": len(fresh),
                "versions": {"index": ix.version, "sid": self.table.version,
                             "model": model_version}}

    @staticmethod
    def _fill(ix: AdIndex, q, k: int, have: int, add, picked: list) -> None:
        """Nearest ads until k are picked; asks ScaNN for more when switched-off or already
        picked ads took places."""
        want = k + have
        while True:
            for ad_id, score in ix.search(q, want):
                add(ad_id, score)
            if len(picked) >= k or want >= len(ix):
                return
            want = min(len(ix), want * 4)
