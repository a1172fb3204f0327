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
from typing import Any, Mapping, Sequence

from leadre.data.schema import MS_PER_DAY
from leadre.prompts import templates as T
from leadre.prompts.catalog import Catalog
from leadre.prompts.config import PromptConfig
from leadre.prompts.render import hard, profile_text, token_counts, tokens_of


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


class ShardPrompts:
    """Prompts of the targets of one shard's kept events (lists in (user, time) order;
    ``row``: catalog row of ad events). Per user: :meth:`start_user`, then :meth:`prompt`
    for its targets in time order."""

    def __init__(self, cfg: PromptConfig, catalog: Catalog, ts: Sequence[int],
                 domain: Sequence[str], action: Sequence[str], row: Sequence[int],
                 title: Sequence[str | None]):
        assert SUPPORTED
        self.cfg, self.ts = cfg, ts
        self.templates = {i: _Template(t) for i, t in enumerate(T.PROMPT_TEMPLATES)}
        pre, post = _slot(T.BEHAVIOUR_ITEM, "days")
        self.headless = not pre  # items start with the day count (one concatenation each)
        acts, cat_acts = set(cfg.history_actions), set(cfg.category_actions)
        sid, ad_title, category = catalog.sid, catalog.title, catalog.category
        # per variant (0: S-IDs, 1: titles): eligible event positions, times, item pieces
        # (before, after the day count), prefix sums of the pieces' counts and lengths
        self.pos: tuple[list[int], list[int]] = ([], [])
        self.times: tuple[list[int], list[int]] = ([], [])
        self.heads: tuple[list[str], list[str]] = ([], [])
        self.tails: tuple[list[str], list[str]] = ([], [])
        sums = ([[0], [0], [0]], [[0], [0], [0]])
        self.cat_pos: list[int] = []
        self.cat: list[str] = []
        pieces: dict[tuple[str, str], tuple[str, str, int, int, int]] = {}
        for k, (d, a) in enumerate(zip(domain, action)):
            if d == "ad":
                r = row[k]
                c = category[r]
                if a in cat_acts and c and c != T.UNKNOWN_CATEGORY:
                    self.cat_pos.append(k)
                    self.cat.append(c)
                if a not in acts:
                    continue
                objs = (sid[r], ad_title[r])
            elif a not in acts:
                continue
            else:
                objs = (title[k], title[k])
            for v, obj in enumerate(objs):
                if not obj:
                    continue
                got = pieces.get((a, obj))
                if got is None:
                    values = {"behaviour": T.BEHAVIOURS[a], "object": obj}
                    h, t = pre.format(**values), post.format(**values)
                    got = pieces[(a, obj)] = (h, t, *token_counts(h + t), len(h) + len(t))
                self.pos[v].append(k)
                self.times[v].append(ts[k])
                self.heads[v].append(got[0])
                self.tails[v].append(got[1])
                for acc, x in zip(sums[v], got[2:]):
                    acc.append(acc[-1] + x)
        self.sum_a, self.sum_b, self.sum_len = zip(*sums)
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
            body = _LJ.join(T.CATEGORY_ITEM.format(category=c, count=n) for c, n in top)
            self.cats_body = (body, *token_counts(body)) if top else ("", 0, 0)
        return self.cats_body if self.cats_body[0] else None

    def prompt(self, target: int, now: int, template: int, use_titles: bool = False
               ) -> tuple[str, int] | None:
        """(text, approx tokens) of the prompt of the current user's target at kept position
        ``target`` (time ``now``); None when over ``max_prompt_tokens``."""
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
        if cfg.categories and cfg.max_categories:
            got = self._categories(end)
            if got is not None:
                (pre, pa_, pb), (post, qa, qb) = tp.cats
                facets.append(pre + got[0] + post)
                a, b = a + got[1] + pa_ + qa, b + got[2] + pb + qb
        if cfg.behaviours and cfg.max_events:
            v = 1 if use_titles else 0
            j = bisect_left(self.pos[v], end)
            i = max(self.item_start[v], j - cfg.max_events)
            if j > i:
                days = [str((now - t) // MS_PER_DAY) for t in self.times[v][i:j]]
                tails = self.tails[v][i:j]
                body = _LJ.join(map(str.__add__, days, tails) if self.headless else
                                map("".join, zip(self.heads[v][i:j], days, tails)))
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
        if tokens > cfg.max_prompt_tokens:
            return None
        return _FJ.join(facets), tokens
