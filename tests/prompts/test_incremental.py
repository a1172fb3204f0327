"""The batch builder's incremental prompts (pieces rendered once per event, token counts summed
over pieces) against the one prompt implementation, ``compose_prompt``, target by target, on
hand-made histories with awkward titles (non-ASCII, S-ID look-alikes, digits, empty) and under
configurations that truncate, drop facets or shorten the window. No Ray: plain function calls.
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from leadre.prompts import PromptConfig
from leadre.prompts.catalog import Catalog
from leadre.prompts.incremental import SUPPORTED, ShardPrompts
from leadre.prompts.render import Event, approx_tokens, compose_prompt, token_counts, tokens_of

DAY = 86_400_000
TITLES = ["racket", "café au lait", "<a_1> lookalike", "2024 model", "x", "", "Ünïcode—dash",
          "ends in letters", "tab\there", "数字 7"]


def make_catalog(n: int = 12) -> Catalog:
    rng = random.Random(1)
    return Catalog(
        ad_ids=[f"ad{i}" for i in range(n)],
        sid=[f"<a_{i % 4}><b_{i}><c_{rng.randrange(3)}>" for i in range(n)],
        title=[TITLES[i % len(TITLES)] for i in range(n)],
        category=[None if i % 5 == 0 else ["sports", "travel", "café", "unknown"][i % 4]
                  for i in range(n)],
        ecpm=[1.0 + i for i in range(n)], active=[True] * n, first_code=[i % 4 for i in range(n)])


def make_users(catalog: Catalog, n_users: int = 6) -> list[list[Event]]:
    rng = random.Random(7)
    users = []
    for _ in range(n_users):
        t, evs = rng.randrange(10 * DAY), []
        for _ in range(rng.randrange(1, 40)):
            t += rng.choice([0, 1, 3_600_000, DAY, 5 * DAY])  # equal times too
            if rng.random() < 0.6:
                evs.append(Event(t, "ad", rng.choice(["impression", "click", "conversion"]),
                                 rng.choice(catalog.ad_ids)))
            else:
                evs.append(Event(t, rng.choice(["video", "news"]), rng.choice(["play", "read"]),
                                 None, rng.choice(TITLES[:5] + TITLES[6:])))
        users.append(evs)
    return users


CONFIGS = [
    {},
    {"max_prompt_tokens": 60},
    {"max_prompt_tokens": 25, "max_events": 3, "max_categories": 2},
    {"instruction": False, "question": False, "categories": False},
    {"profile": False, "behaviours": False},
    {"history_actions": ["click", "play"], "category_actions": ["impression"], "max_events": 1},
    {"max_events": 0, "max_categories": 0},
]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_every_target_prompt_equals_compose_prompt(overrides):
    assert SUPPORTED  # the shipped templates cut cleanly (else the builder never uses this)
    cfg = PromptConfig(**overrides)
    catalog = make_catalog()
    users = make_users(catalog)
    profiles = [None, {"age": 30, "city": "Zürich"}, {"gender": "f"}, None, {"age": 7}, None]
    flat = [e for evs in users for e in evs]
    fast = ShardPrompts(cfg, catalog, [e.ts for e in flat],
                        pa.array([e.domain for e in flat]), pa.array([e.action for e in flat]),
                        np.array([catalog.index.get(e.ad_id, -1) for e in flat]),
                        pa.array([e.title for e in flat], pa.string()))
    first, checked = 0, 0
    for evs, profile in zip(users, profiles):
        fast.start_user(profile, first)
        for t, target in enumerate(evs):
            for tpl in (0, 1, 2):
                for titles in (False, True):
                    want = compose_prompt(profile, evs, catalog.sid_of, catalog.title_of, cfg,
                                          ad_category_of=catalog.category_of, now=target.ts,
                                          template=tpl, use_titles=titles, presorted=True)
                    got = fast.prompt(first + t, target.ts, tpl, titles)
                    assert got == want, (t, tpl, titles)
                    checked += 1
        first += len(evs)
    assert checked > 300


def test_token_counts_add_up_over_cuts_at_hard_characters():
    rng = random.Random(3)
    alphabet = "ab Z9<>_^;:.,-é数 \t" + "<a_12>"
    for _ in range(2000):
        parts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))
                 for _ in range(3)]
        text = "; ".join(parts)
        ones = sum(token_counts(p)[0] for p in parts) + 2 * token_counts("; ")[0]
        letters = sum(token_counts(p)[1] for p in parts) + 2 * token_counts("; ")[1]
        assert approx_tokens(text) == tokens_of(ones, letters), text
