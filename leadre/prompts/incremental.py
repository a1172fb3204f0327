"""The main-task prompt of every target of a shard, from pieces rendered once per event: what
:func:`leadre.prompts.render.compose_prompt` does per call (the one definition of the prompt,
which serving and the per-user builder use), without re-rendering a user's history for each
of its targets. The batch builder (``batch.py``) uses it; a test checks it against
``compose_prompt`` text for text.

Per event that can appear in a prompt, the behaviour item minus its day count (which depends on
the target's time) is rendered once, with its :func:`token_counts`; a prompt is then the
template's fixed pieces, the profile sentence (once per user and template), the top categories
(counted incrementally as the targets move forward in time) and a join over a window of items.
Its token count is the sum of the pieces' counts: exact because every cut between pieces has a
:func:`hard` character on one side, which :data:`SUPPORTED` checks on the templates (when a
template breaks that, the batch builder calls ``compose_prompt`` instead). A prompt over
``max_prompt_tokens`` gets ``None``: the caller lets ``compose_prompt`` truncate it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from leadre.data.schema import MS_PER_DAY
from leadre.prompts import templates as T
from leadre.prompts.catalog import Catalog
from leadre.prompts.config import PromptConfig
from leadre.prompts.render import (Prompt, fit_prompt, hard, profile_text, token_counts,
                                   tokens_of)


def _slot(text: str, name: str) -> tuple[str, str] | None:
    """(before, after) a template's one ``{name}`` slot, when both cut cleanly."""
    parts = text.split("{" + name + "}")
    if len(parts) != 2:
        return None
    pre, post = parts
    if (pre and (pre[-1] == "}" or not hard(pre[-1]))) or (
            post and (post[0] == "{" or not hard(post[0]))):
        return None
    return pre, post


def _supported() -> bool:
    joiners_ok = all(j and hard(j[0]) and hard(j[-1]) for j in (T.FACET_JOINER, T.LIST_JOINER))
    slots = [_slot(T.BEHAVIOUR_ITEM, "days")] + [
        _slot(getattr(t, f), f) for t in T.PROMPT_TEMPLATES for f in ("categories", "behaviours")]
    return joiners_ok and all(s is not None for s in slots)


SUPPORTED = _supported()
_LJ, _FJ = T.LIST_JOINER, T.FACET_JOINER
_LJ_A, _LJ_B = token_counts(_LJ)
_FJ_A, _FJ_B = token_counts(_FJ)


class _Template:
    """One template's fixed pieces with their counts."""

    def __init__(self, tpl: T.PromptTemplate):
        self.tpl = tpl
        self.instruction = (tpl.instruction, *token_counts(tpl.instruction))
        self.question = (tpl.question, *token_counts(tpl.question))
        self.cats = [(s, *token_counts(s)) for s in _slot(tpl.categories, "categories")]
        self.behaviours = [(s, *token_counts(s)) for s in _slot(tpl.behaviours, "behaviours")]


def _numpy(x: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return pc.fill_null(x, False).to_numpy(zero_copy_only=False)


class ShardPrompts:
    """Prompts of the targets of one shard's kept events (in (user, time) order: times as a
    list, domain / action / title as Arrow arrays, ``row``: catalog row of ad events). Per
    user: :meth:`start_user`, then :meth:`prompt` for its targets in time order."""

    def __init__(self, cfg: PromptConfig, catalog: Catalog, ts: list[int],
                 domain: pa.Array | pa.ChunkedArray, action: pa.Array | pa.ChunkedArray,
                 row: np.ndarray, title: pa.Array | pa.ChunkedArray):
        assert SUPPORTED
        self.cfg, self.ts = cfg, ts
        domain, action, title = (x.combine_chunks() if isinstance(x, pa.ChunkedArray) else x
                                 for x in (domain, action, title))
        if catalog.content:  # content objects as Catalog.content_of shows them, per title
            codes = pc.dictionary_encode(title)
            title = pa.array(map(catalog.content_of, codes.dictionary.to_pylist()),
                             pa.string()).take(codes.indices)
        self.templates = {i: _Template(t) for i, t in enumerate(T.PROMPT_TEMPLATES)}
        pre, post = _slot(T.BEHAVIOUR_ITEM, "days")
        self.headless = not pre  # items start with the day count (one concatenation each)
        is_ad = _numpy(pc.equal(domain, "ad"))
        ad_row = np.where(is_ad, row, 0)

        def among(actions: list[str]) -> np.ndarray:
            return _numpy(pc.is_in(action, pa.array(sorted(set(actions)), pa.string())))

        # Events counted towards the categories: positions and category names.
        cat = catalog.category
        known = np.array([bool(c) and c != T.UNKNOWN_CATEGORY for c in cat] or [False])
        self.cat_pos = np.flatnonzero(is_ad & among(cfg.category_actions) &
                                      known[ad_row]).tolist()
        self.cat = [cat[r] for r in row[self.cat_pos].tolist()]
        # Per variant (0: S-IDs, 1: titles): positions of the events the behaviour facet can
        # show, their times, item pieces before / after the day count (rendered once per
        # distinct (action, object)), and prefix sums of the pieces' counts and lengths.
        self.pos, self.times, self.heads, self.tails = [], [], [], []
        self.sum_a, self.sum_b, self.sum_len = [], [], []
        shown = among(cfg.history_actions)
        for objects in (catalog.sid, catalog.title):
            obj = pc.if_else(pa.array(is_ad), pa.array(objects, pa.string()).take(
                pa.array(ad_row)), title)
            pos = np.flatnonzero(shown & _numpy(pc.greater(pc.utf8_length(obj), 0)))
            take = pa.array(pos)
            acts = pc.dictionary_encode(action.take(take))
            objs = pc.dictionary_encode(obj.take(take))
            m = max(len(objs.dictionary), 1)
            key = (acts.indices.to_numpy(zero_copy_only=False).astype(np.int64) * m
                   + objs.indices.to_numpy(zero_copy_only=False))
            keys, inverse = np.unique(key, return_inverse=True)
            act_names, obj_names = acts.dictionary.to_pylist(), objs.dictionary.to_pylist()
            heads, tails, counts = [], [], []
            for k in keys.tolist():
                values = {"behaviour": T.BEHAVIOURS[act_names[k // m]], "object": obj_names[k % m]}
                h, t = pre.format(**values), post.format(**values)
                heads.append(h)
                tails.append(t)
                counts.append((*token_counts(h + t), len(h) + len(t)))
            inv = inverse.tolist()
            self.pos.append(pos.tolist())
            self.times.append(np.asarray(ts, np.int64)[pos].tolist() if len(pos) else [])
            self.heads.append(list(map(heads.__getitem__, inv)))
            self.tails.append(list(map(tails.__getitem__, inv)))
            per = np.array(counts, np.int64).reshape(-1, 3)[inverse]
            sums = np.concatenate([np.zeros((1, 3), np.int64), np.cumsum(per, 0)]).T.tolist()
            for acc, x in zip((self.sum_a, self.sum_b, self.sum_len), sums):
                acc.append(x)
        self.start_user(None, 0)

    def start_user(self, profile: Mapping[str, Any] | None, first: int) -> None:
        """The next user: profile, position of their first kept event."""
        cfg = self.cfg
        self.first = first
        self.profile = profile_text(profile) if cfg.profile else ""
        self.profile_facets: dict[int, tuple[str, int, int]] = {}
        self.item_start = [bisect_left(p, first) for p in self.pos]
        self.cat_next = bisect_left(self.cat_pos, first)
        self.counts: Counter = Counter()
        self.cats_body: tuple[str, int, int] | None = None
        self.top: list[tuple[str, int]] = []

    def _categories(self, end: int) -> tuple[str, int, int] | None:
        """Top categories over events before ``end``: (joined items, counts), or None."""
        cfg, cat_pos = self.cfg, self.cat_pos
        i = self.cat_next
        while i < len(cat_pos) and cat_pos[i] < end:
            self.counts[self.cat[i]] += 1
            i += 1
        if i != self.cat_next or self.cats_body is None:
            self.cat_next = i
            top = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:cfg.max_categories]
            self.top = top
            body = _LJ.join(T.CATEGORY_ITEM.format(category=c, count=n) for c, n in top)
            self.cats_body = (body, *token_counts(body)) if top else ("", 0, 0)
        return self.cats_body if self.cats_body[0] else None

    def prompt(self, target: int, now: int, template: int, use_titles: bool = False) -> Prompt:
        """The prompt of the current user's target at kept position ``target`` (time
        ``now``), as ``compose_prompt`` gives it."""
        cfg, tp = self.cfg, self.templates[template]
        end = bisect_left(self.ts, now, self.first, target + 1)  # events before now
        facets, a, b = [], 0, 0
        if cfg.instruction:
            facets.append(tp.instruction[0])
            a, b = tp.instruction[1], tp.instruction[2]
        if self.profile:
            got = self.profile_facets.get(template)
            if got is None:
                text = tp.tpl.profile.format(profile=self.profile)
                got = self.profile_facets[template] = (text, *token_counts(text))
            facets.append(got[0])
            a, b = a + got[1], b + got[2]
        cats = None
        if cfg.categories and cfg.max_categories:
            cats = self._categories(end)
            if cats is not None:
                (pre, pa_, pb), (post, qa, qb) = tp.cats
                facets.append(pre + cats[0] + post)
                a, b = a + cats[1] + pa_ + qa, b + cats[2] + pb + qb
        items: list[str] = []
        if cfg.behaviours and cfg.max_events:
            v = 1 if use_titles else 0
            j = bisect_left(self.pos[v], end)
            i = max(self.item_start[v], j - cfg.max_events)
            if j > i:
                days = [str((now - t) // MS_PER_DAY) for t in self.times[v][i:j]]
                tails = self.tails[v][i:j]
                items = (list(map(str.__add__, days, tails)) if self.headless else
                         list(map("".join, zip(self.heads[v][i:j], days, tails))))
                body = _LJ.join(items)
                n = j - i
                digits = len(body) - (self.sum_len[v][j] - self.sum_len[v][i]) - (n - 1) * len(_LJ)
                (pre, pa_, pb), (post, qa, qb) = tp.behaviours
                facets.append(pre + body + post)
                a += self.sum_a[v][j] - self.sum_a[v][i] + digits + (n - 1) * _LJ_A + pa_ + qa
                b += self.sum_b[v][j] - self.sum_b[v][i] + (n - 1) * _LJ_B + pb + qb
        if cfg.question:
            facets.append(tp.question[0])
            a, b = a + tp.question[1], b + tp.question[2]
        a, b = a + (len(facets) - 1) * _FJ_A, b + (len(facets) - 1) * _FJ_B
        tokens = tokens_of(a, b)
        if tokens > cfg.max_prompt_tokens:  # the one truncation policy decides what goes
            return fit_prompt(template, cfg, self.profile, self.top if cats else [], items)
        return Prompt(_FJ.join(facets), tokens, False, False)
