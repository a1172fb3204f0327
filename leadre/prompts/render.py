"""Prompt text of the main task: one user's profile and past events -> the prompt, with an
approximate token count. :func:`compose_prompt` is the one implementation of the prompt: the
example builder (``examples.py``) calls it for every training and evaluation prompt and
serving calls it through :func:`build_user_prompt`, so online and offline cannot drift.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections import Counter
from datetime import datetime
from operator import attrgetter
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from leadre.data.schema import MS_PER_DAY
from leadre.prompts import templates as T
from leadre.prompts.config import PromptConfig
from leadre.sids.table import SID_TOKEN


class Event(NamedTuple):
    """One behaviour event. ``ts`` is epoch milliseconds (UTC)."""

    ts: int
    domain: str
    action: str
    ad_id: str | None = None
    title: str | None = None


# --------------------------------------------------------------------------- tokens

_WORD = re.compile(r"[^\W\d_]+")
_ASCII_LETTERS = bytes(c for c in range(128) if chr(c).isalpha())
_ASCII_NOT_OTHER = _ASCII_LETTERS + bytes(  # ... and str.split()'s spaces, \x1c-\x1f too
    c for c in range(128) if chr(c).isspace())
# Letters -> "a", everything else -> " ": a word starts at every " a" (or at byte 0).
_ASCII_WORD_MAP = bytes(ord("a") if c in _ASCII_LETTERS else ord(" ") for c in range(256))


def approx_tokens(text: str) -> int:
    """Approximate token count, used for ``max_prompt_tokens`` before the tokenizer exists.

    Meant to over-estimate a BPE tokenizer trained on this kind of text: every S-ID token
    (``<a_12>``) counts 1 (S-ID tokens are atomic vocabulary entries); words (runs of letters)
    count a token per 4 letters, rounded up per word (typical English BPE averages ~4
    characters per token; computed as ceil((letters + 3 * words) / 4), which bounds the
    per-word rounding); every digit counts 1 (Llama-style tokenizers split digits) and so does
    every other non-space character (punctuation, ``^``). Whitespace is free.
    """
    return tokens_of(*token_counts(text))


def token_counts(text: str) -> tuple[int, int]:
    """The two sums :func:`approx_tokens` is made of: (S-IDs + other characters, letters +
    3 * words). Both add up over pieces of a text cut where one side is a :func:`hard`
    character (no word or S-ID spans the cut), which lets the batch builder count a prompt
    from counts of its pieces."""
    rest, n_sid = SID_TOKEN.subn(" ", text)
    if rest.isascii():
        # The same counts with bytes.translate / count (C loops, no match objects): this
        # function runs on every prompt, several times when one is over budget.
        raw = rest.encode()
        marks = raw.translate(_ASCII_WORD_MAP)
        words = marks.count(b" a") + marks.startswith(b"a")
        letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
        others = len(raw.translate(None, _ASCII_NOT_OTHER))
    else:
        kept, words = _WORD.subn("", rest)
        letters = len(rest) - len(kept)
        others = len("".join(kept.split()))
    return n_sid + others, letters + 3 * words


def tokens_of(ones: int, letters_words: int) -> int:
    """:func:`approx_tokens` from (summed) :func:`token_counts`."""
    return ones + -(-letters_words // 4)


def hard(char: str) -> bool:
    """True when no word or S-ID token can contain ``char`` (space, most punctuation)."""
    return char.isspace() or not (char.isalnum() or char in "<>_")


# --------------------------------------------------------------------------- prompts


class Prompt(NamedTuple):
    text: str
    tokens: int
    truncated: bool  # something was dropped to fit max_prompt_tokens
    over_budget: bool  # still over after dropping everything droppable


def _ts_ms(value: Any) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if hasattr(value, "value") and hasattr(value, "tz_localize"):  # pandas Timestamp
        return int(value.value // 1_000_000)
    return int(value)


_event_ts = attrgetter("ts")


def as_event(e: Event | Mapping[str, Any]) -> Event:
    if isinstance(e, Event):
        return e
    return Event(_ts_ms(e["ts"]), e["domain"], e["action"], e.get("ad_id"), e.get("title"))


def profile_text(profile: Mapping[str, Any] | None) -> str:
    """The known profile attributes rendered and joined; "" when nothing is known."""
    if not profile:
        return ""
    parts = []
    for name, fmt in T.PROFILE_PARTS.items():
        value = profile.get(name)
        if value is None or value != value or (isinstance(value, str) and not value.strip()):
            continue
        parts.append(fmt.format(**{name: value}))
    return T.PROFILE_JOINER.join(parts)


def top_categories(events: Iterable[Event], category_of: Callable[[str], str | None] | None,
                   cfg: PromptConfig) -> list[tuple[str, int]]:
    """Most frequent ad categories over ``events`` (ties by name), at most max_categories."""
    if category_of is None or not cfg.max_categories:
        return []
    acts = cfg.category_actions
    counts = Counter()
    for e in events:
        if e.domain == "ad" and e.action in acts and e.ad_id is not None:
            cat = category_of(e.ad_id)
            if cat and cat != T.UNKNOWN_CATEGORY:
                counts[cat] += 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: cfg.max_categories]


def compose_prompt(profile: Mapping[str, Any] | None, events: Sequence[Event | Mapping[str, Any]],
                   sid_of: Callable[[str], str | None],
                   ad_title_of: Callable[[str], str | None] | None,
                   cfg: PromptConfig, *,
                   ad_category_of: Callable[[str], str | None] | None = None,
                   now: Any = None, template: int = 0, use_titles: bool = False,
                   presorted: bool = False,
                   content_of: Callable[[str], str | None] | None = None) -> Prompt:
    """The main-task prompt for one user, with its approximate token count.

    ``events`` are the user's past events (mappings with ts, domain, action, ad_id, title, or
    :class:`Event`); events at or after ``now`` (default: the last event) are ignored, so a
    caller cannot leak the future by passing too much. Ad objects are S-IDs via ``sid_of``
    (titles via ``ad_title_of`` when ``use_titles``); ads without one are left out.
    ``presorted``: ``events`` is a list of :class:`Event` already in time order (the batch
    builder's guarantee), so the copy and the order check are skipped; same text.
    ``content_of``: content title -> what the prompt shows for it (``Catalog.content_of``,
    :func:`content_text`); default the title.
    """
    if presorted:
        evs = events
    else:
        evs = [as_event(e) for e in events]
        if evs and any(evs[i].ts > evs[i + 1].ts for i in range(len(evs) - 1)):
            evs.sort(key=lambda e: e.ts)
    now_ms = _ts_ms(now) if now is not None else (evs[-1].ts + 1 if evs else 0)
    evs = evs[:bisect_left(evs, now_ms, key=_event_ts)]  # in time order: a prefix
    object_of = ad_title_of if use_titles else sid_of

    prof = profile_text(profile) if cfg.profile else ""
    cats = top_categories(evs, ad_category_of, cfg) if cfg.categories else []
    items: list[str] = []
    if cfg.behaviours and cfg.max_events:
        acts = cfg.history_actions
        for e in reversed(evs):
            if e.action not in acts:
                continue
            if e.domain == "ad":
                obj = object_of(e.ad_id) if (e.ad_id is not None and object_of) else None
            else:
                obj = content_of(e.title) if content_of and e.title else e.title
            if not obj:
                continue
            items.append(T.BEHAVIOUR_ITEM.format(days=(now_ms - e.ts) // MS_PER_DAY,
                                                 behaviour=T.BEHAVIOURS[e.action], object=obj))
            if len(items) == cfg.max_events:
                break
        items.reverse()
    return fit_prompt(template, cfg, prof, cats, items)


def content_text(title: str, code: str | None, mode: str) -> str:
    """The object of a content event under ``PromptConfig.content_object`` ``mode``: the
    title, its knowledge-token ``code``, or both (the title alone where it has no code)."""
    if mode == "title" or not code:
        return title
    return code if mode == "code" else f"{title} {code}"


def fit_prompt(template: int, cfg: PromptConfig, prof: str, cats: list[tuple[str, int]],
               items: list[str]) -> Prompt:
    """The prompt of the gathered facets (profile text, top categories, behaviour items oldest
    first), made to fit ``max_prompt_tokens``: the one truncation policy (also used by the
    batch builder for the prompts its pieces show to be over budget)."""
    tpl = T.PROMPT_TEMPLATES[template]
    head = [tpl.instruction] if cfg.instruction else []
    tail = [tpl.question] if cfg.question else []

    def render() -> str:
        facets = list(head)
        if prof:
            facets.append(tpl.profile.format(profile=prof))
        if cats:
            facets.append(tpl.categories.format(categories=T.LIST_JOINER.join(
                T.CATEGORY_ITEM.format(category=c, count=n) for c, n in cats)))
        if items:
            facets.append(tpl.behaviours.format(behaviours=T.LIST_JOINER.join(items)))
        return T.FACET_JOINER.join(facets + tail)

    text = render()
    tokens = approx_tokens(text)
    if tokens <= cfg.max_prompt_tokens:
        return Prompt(text, tokens, False, False)
    # Over budget: drop the oldest behaviours, then the rarest categories, then the profile.
    excess = tokens - cfg.max_prompt_tokens
    sep = approx_tokens(T.LIST_JOINER)
    drop = 0
    while drop < len(items) and excess > 0:
        excess -= approx_tokens(items[drop]) + sep
        drop += 1
    items = items[drop:]
    text = render()
    tokens = approx_tokens(text)
    while tokens > cfg.max_prompt_tokens and cats:
        cats = cats[:-1]
        text = render()
        tokens = approx_tokens(text)
    if tokens > cfg.max_prompt_tokens and prof:
        prof = ""
        text = render()
        tokens = approx_tokens(text)
    return Prompt(text, tokens, True, tokens > cfg.max_prompt_tokens)


def build_user_prompt(profile: Mapping[str, Any] | None,
                      events: Sequence[Event | Mapping[str, Any]],
                      sid_of: Callable[[str], str | None],
                      ad_title_of: Callable[[str], str | None] | None = None,
                      cfg: PromptConfig | None = None, *,
                      ad_category_of: Callable[[str], str | None] | None = None,
                      now: Any = None, template: int = 0, use_titles: bool = False,
                      content_of: Callable[[str], str | None] | None = None) -> str:
    """The main-task prompt for ONE user (the function serving uses online).

    ``profile``: mapping with any of age, gender, city, education, industry (or None);
    ``events``: the user's events, each a mapping with ts (epoch ms int, datetime or pandas
    Timestamp), domain, action, ad_id, title; ``sid_of`` / ``ad_title_of`` /
    ``ad_category_of``: ad_id -> S-ID / title / category (None when unknown; e.g.
    ``SidTable.sids`` or a :class:`Catalog`'s methods); ``cfg``: facets and limits
    (default ``PromptConfig()``); ``now``: the request time (events at or after it are
    ignored; default just after the last event); ``template``: the variant (any is
    in-distribution for a model trained on the mix); ``content_of``: content title -> what the
    prompt shows (see :func:`compose_prompt`). Every training prompt comes from this
    function too (through :func:`compose_prompt`), so online and offline prompts cannot drift.
    """
    return compose_prompt(profile, events, sid_of, ad_title_of, cfg or PromptConfig(),
                          ad_category_of=ad_category_of, now=now, template=template,
                          use_titles=use_titles, content_of=content_of).text

