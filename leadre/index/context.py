"""What serving knows about a user, and how it turns that into a query.

A *user context* is the small JSON record the candidate store keeps per user::

    {"profile": {"age": 31, "gender": "f", "city": ..., "education": ..., "industry": ...},
     "categories": [["sports", 12], ["travel", 4]],      # long-term: engaged ad categories
     "events": [{"ts": 1735689600.0, "domain": "video", "action": "play",
                 "ad_id": null, "title": "badminton smash tips"}, ...]}   # oldest first

``ray_jobs/warm_cache.py`` writes it for every user from the ingest tables; the matcher uses
its events for real-time ANN queries on a cache miss (:class:`leadre.index.query.QueryBuilder`),
the generator builds the LLM prompt from it. A request may add ``recent_events`` (newer than
anything stored) on top.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import pandas as pd

from leadre.data.schema import ENGAGE, PROFILE_FIELDS

if TYPE_CHECKING:
    from leadre.prompts import PromptConfig

log = logging.getLogger(__name__)


def _ts(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return value.replace(tzinfo=value.tzinfo or timezone.utc).timestamp()
    if isinstance(value, pd.Timestamp):
        return value.timestamp()
    try:
        return pd.Timestamp(value).timestamp()
    except (ValueError, TypeError):
        return None


def merge_events(request_events: Sequence[dict] | None, stored: Sequence[dict] | None,
                 limit: int) -> list[dict]:
    """Stored history followed by the request's (newer) events, the last ``limit``."""
    events = list(stored or []) + list(request_events or [])
    return events[-limit:] if limit > 0 else []


def user_contexts(ingest_dir: str, max_events: int = 50, max_categories: int = 5,
                  user_ids: Iterable[str] | None = None) -> dict[str, dict]:
    """Contexts of the users of an ingest directory (all, or ``user_ids``)."""
    from leadre.artifacts import read_table

    users = read_table(ingest_dir, "users").to_pandas()
    events = read_table(ingest_dir, "events").to_pandas()
    ads = read_table(ingest_dir, "ads").select(["ad_id", "category"]).to_pandas()
    if user_ids is not None:
        keep = set(user_ids)
        users = users[users.user_id.isin(keep)]
        events = events[events.user_id.isin(keep)]
    return contexts_from_frames(users, events, ads, max_events, max_categories)


def contexts_from_frames(users: pd.DataFrame, events: pd.DataFrame, ads: pd.DataFrame,
                         max_events: int = 50, max_categories: int = 5) -> dict[str, dict]:
    """Vectorised context building (also used per batch by the Ray Data warm-up job)."""
    cat_of = dict(zip(ads.ad_id, ads.category))
    out: dict[str, dict] = {}
    for row in users.itertuples(index=False):
        prof = {}
        for f in PROFILE_FIELDS:
            v = getattr(row, f, None)
            if v is not None and not (isinstance(v, float) and math.isnan(v)) and v is not pd.NA:
                prof[f] = int(v) if f == "age" else str(v)
        out[row.user_id] = {"profile": prof, "categories": [], "events": []}
    if len(events):
        events = events.sort_values(["user_id", "ts"], kind="stable")
        for uid, g in events.groupby("user_id", sort=False):
            ctx = out.setdefault(uid, {"profile": {}, "categories": [], "events": []})
            engaged = g[g.action.isin(ENGAGE) & g.ad_id.notna()]
            counts = Counter(cat_of.get(a) for a in engaged.ad_id if cat_of.get(a))
            ctx["categories"] = [[c, n] for c, n in counts.most_common(max_categories)]
            tail = g.tail(max_events)
            ctx["events"] = [
                _event(ts, d, a, ad, t, cat_of)
                for ts, d, a, ad, t in zip(tail.ts, tail.domain, tail.action, tail.ad_id,
                                           tail.title)]
    return out


def _event(ts, domain, action, ad_id, title, cat_of: dict) -> dict:
    ad = None if ad_id is None or isinstance(ad_id, float) else str(ad_id)
    ev = {"ts": _ts(ts), "domain": domain, "action": action, "ad_id": ad,
          "title": None if title is None or isinstance(title, float) else str(title)}
    if ad is not None and cat_of.get(ad):
        ev["category"] = cat_of[ad]  # lets the prompt builder count long-term categories
    return ev


# --------------------------------------------------------------------------- prompts


def build_prompt(ctx: dict | None, table: Any, now: float | None = None,
                 cfg: "PromptConfig | None" = None,
                 content_of: Callable[[str], str | None] | None = None) -> str:
    """The main-task (intent-aware) prompt of a user context, in the training wording:
    ``leadre.prompts.build_user_prompt`` is the function every training prompt comes from, so
    online and offline prompts cannot drift; ``cfg`` is the model's training
    ``PromptConfig`` (:func:`leadre.prompts.trained_prompt_config`; default: the defaults).
    Long-term categories are counted over the stored events (each ad event carries its
    category). ``content_of``: content title -> what the prompt shows (its knowledge token
    under ``cfg.content_object``); default the title."""
    from leadre.prompts import build_user_prompt

    ctx = ctx or {}
    events = [{**e, "ts": int(round((e.get("ts") or 0.0) * 1000))} for e in ctx.get("events", [])]
    cats = {e["ad_id"]: e["category"] for e in events if e.get("ad_id") and e.get("category")}

    def sid_of(ad_id: str) -> str | None:
        return table.sids([ad_id])[0]

    return build_user_prompt(ctx.get("profile") or None, events, sid_of,
                             cfg=cfg, ad_category_of=cats.get, content_of=content_of,
                             now=None if now is None else int(now * 1000))
