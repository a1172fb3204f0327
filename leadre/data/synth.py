"""The synthetic ad world: the embedded default dataset.

Latent structure, so the retrieval task is learnable and measurable:

* each user has a sparse latent interest distribution over ad categories, pulled towards a
  prior that depends on the profile (age, gender, education, industry), so profiles carry signal;
* ads have category-coherent titles/descriptions, an advertiser and an eCPM that varies within
  a category (category base x advertiser x ad noise), so DPO has something to prefer;
* short videos and news are drawn mostly from the user's interests, so the content-domain
  facets predict ad interests;
* ad impressions are half interest-driven, half broad; clicks and conversions follow interest.

Everything is vectorised numpy; 100k users x 10k ads takes seconds. The latent truth is
written next to the tables (``latent/``) so tests and benchmarks can measure the signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from leadre import artifacts
from leadre.data import schema
from leadre.data.config import SynthConfig
from leadre.data.vocab import (AD_DESCRIPTION_TEMPLATES, AD_TITLE_TEMPLATES, AGE_BUCKETS,
                                CATEGORIES, CITIES, CONTENT_TITLE_TEMPLATES, EDUCATIONS,
                                GENDERS, INDUSTRIES)

DOMAINS = ("ad", "video", "news")


@dataclass
class World:
    """The generated tables plus the latent truth behind them."""

    ads: pa.Table
    users: pa.Table
    events: pa.Table
    interests: np.ndarray  # [users, categories] latent interest distributions
    ad_category: np.ndarray  # [ads] category index
    content: pa.Table  # every content title with its domain and category
    categories: list[str]


def _take(values: list[str] | pa.Array, idx: np.ndarray) -> pa.Array:
    """Strings by index; negative index -> null."""
    arr = values if isinstance(values, pa.Array) else pa.array(values, pa.string())
    return arr.take(pa.array(idx, mask=idx < 0, type=pa.int64()))


def _sample_rows(cum: np.ndarray, rows: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Vectorised categorical sampling: for each i, a column of ``cum[rows[i]]`` (row-wise
    cumulative probabilities) at uniform ``r[i]``. Offsets keep it one searchsorted."""
    n_cols = cum.shape[1]
    flat = (cum / cum[:, -1:] + np.arange(len(cum))[:, None]).ravel()
    pos = np.searchsorted(flat, rows + r * (1 - 1e-12), side="right")
    return np.minimum(pos - rows * n_cols, n_cols - 1)


def _make_ads(cfg: SynthConfig, rng: np.random.Generator, cats: list[str]):
    n_cat = len(cats)
    # Every category gets at least one ad; the rest follow mildly uneven category sizes.
    weights = rng.dirichlet(np.full(n_cat, 5.0))
    ad_cat = np.concatenate([np.arange(n_cat), rng.choice(n_cat, cfg.ads - n_cat, p=weights)])
    rng.shuffle(ad_cat)
    titles, descs, advertisers = [], [], []
    n_adv = [len(CATEGORIES[c][3]) for c in cats]
    adv_idx = np.array([rng.integers(n_adv[c]) for c in ad_cat])
    for j, c in enumerate(ad_cat):
        nouns, quals, topics, stems = CATEGORIES[cats[c]]
        adv = stems[adv_idx[j]]
        noun, qual, topic = (nouns[rng.integers(len(nouns))], quals[rng.integers(len(quals))],
                             topics[rng.integers(len(topics))])
        model = f"{chr(65 + rng.integers(26))}{rng.integers(10, 999)}"
        tmpl = AD_TITLE_TEMPLATES[rng.integers(len(AD_TITLE_TEMPLATES))]
        titles.append(tmpl.format(advertiser=adv, qualifier=qual, noun=noun) + f" {model}")
        dtmpl = AD_DESCRIPTION_TEMPLATES[rng.integers(len(AD_DESCRIPTION_TEMPLATES))]
        descs.append(dtmpl.format(advertiser=adv, qualifier=qual, noun=noun, topic=topic))
        advertisers.append(f"{adv} {cats[c].replace('_', ' ').title()}")
    # eCPM = category base x advertiser effect x per-ad noise: varies within a category.
    cat_base = np.exp(rng.normal(1.0, 0.5, n_cat))
    adv_effect = np.exp(rng.normal(0.0, 0.3, (n_cat, max(n_adv))))
    ecpm = cat_base[ad_cat] * adv_effect[ad_cat, adv_idx] * np.exp(rng.normal(0, 0.5, cfg.ads))
    active = rng.random(cfg.ads) >= cfg.inactive_share
    ads = pa.table({
        "ad_id": [f"ad{j:06d}" for j in range(cfg.ads)],
        "title": titles,
        "description": descs,
        "category": [cats[c] for c in ad_cat],
        "advertiser": advertisers,
        "ecpm": np.round(ecpm, 4),
        "active": active,
    }, schema=schema.ADS)
    return ads, ad_cat


def _make_users(cfg: SynthConfig, rng: np.random.Generator, n_cat: int):
    n = cfg.users
    attrs = {
        "age_bucket": (len(AGE_BUCKETS), rng.choice(len(AGE_BUCKETS), n, p=[.2, .3, .25, .17, .08])),
        "gender": (len(GENDERS), rng.integers(len(GENDERS), size=n)),
        "education": (len(EDUCATIONS), rng.choice(len(EDUCATIONS), n, p=[.3, .45, .2, .05])),
        "industry": (len(INDUSTRIES), rng.integers(len(INDUSTRIES), size=n)),
    }
    # Each attribute value pulls the interest prior towards a few categories.
    logits = np.zeros((n, n_cat))
    for size, values in attrs.values():
        affinity = rng.normal(0.0, 1.0, (size, n_cat))
        logits += cfg.profile_strength * affinity[values] / np.sqrt(len(attrs))
    prior = np.exp(logits - logits.max(1, keepdims=True))
    prior /= prior.sum(1, keepdims=True)
    # Dirichlet with a per-user alpha via normalised gammas (numpy's dirichlet takes one alpha).
    g = rng.gamma(cfg.interest_alpha * n_cat * prior)
    g += 1e-12
    interests = g / g.sum(1, keepdims=True)

    lo = np.array([b[0] for b in AGE_BUCKETS])
    hi = np.array([b[1] for b in AGE_BUCKETS])
    b = attrs["age_bucket"][1]
    age = rng.integers(lo[b], hi[b] + 1)
    city = rng.integers(len(CITIES), size=n)

    def maybe_null(idx: np.ndarray) -> np.ndarray:
        return np.where(rng.random(n) < cfg.profile_missing, -1, idx)

    users = pa.table({
        "user_id": [f"u{i:07d}" for i in range(n)],
        "age": pa.array(age.astype(np.int32), mask=maybe_null(age) < 0),
        "gender": _take(GENDERS, maybe_null(attrs["gender"][1])),
        "city": _take(CITIES, maybe_null(city)),
        "education": _take(EDUCATIONS, maybe_null(attrs["education"][1])),
        "industry": _take(INDUSTRIES, maybe_null(attrs["industry"][1])),
    }, schema=schema.USERS)
    return users, interests


def _content_catalog(cats: list[str]):
    """All content titles; (offset, count) per (category, domain) for vectorised sampling."""
    titles, cat_of, dom_of = [], [], []
    offsets = np.zeros((len(cats), len(DOMAINS)), dtype=np.int64)
    counts = np.zeros_like(offsets)
    for c, name in enumerate(cats):
        topics = CATEGORIES[name][2]
        for d, dom in enumerate(DOMAINS):
            if dom == "ad":
                continue
            offsets[c, d] = len(titles)
            for topic in topics:
                for tmpl in CONTENT_TITLE_TEMPLATES[dom]:
                    titles.append(tmpl.format(topic=topic))
                    cat_of.append(name)
                    dom_of.append(dom)
            counts[c, d] = len(titles) - offsets[c, d]
    table = pa.table({"title": titles, "domain": dom_of, "category": cat_of})
    return table, offsets, counts


def generate(cfg: SynthConfig) -> World:
    rng = np.random.default_rng(cfg.seed)
    cats = list(CATEGORIES)
    n_cat = len(cats)
    ads, ad_cat = _make_ads(cfg, rng, cats)
    users, interests = _make_users(cfg, rng, n_cat)
    content, c_off, c_cnt = _content_catalog(cats)

    # --- base events: impressions and content, uniformly spread over the window
    n_ev = cfg.min_events + rng.poisson(cfg.mean_events - cfg.min_events, cfg.users)
    user = np.repeat(np.arange(cfg.users), n_ev)
    n = len(user)
    t0 = np.datetime64(cfg.start, "ms").astype(np.int64)
    ts = t0 + rng.integers(0, cfg.days * schema.MS_PER_DAY, n)
    dom = rng.choice(3, n, p=[cfg.ad_share, cfg.video_share, 1 - cfg.ad_share - cfg.video_share])

    interest_cum = np.cumsum(interests, axis=1)
    cat = _sample_rows(interest_cum, user, rng.random(n))
    on_interest = np.where(dom == 0, cfg.impression_on_interest, cfg.content_on_interest)
    broad = rng.random(n) >= on_interest
    cat[broad] = rng.integers(n_cat, size=int(broad.sum()))

    # ad within category, by a Zipf popularity that is independent of eCPM
    ad = np.full(n, -1, dtype=np.int64)
    is_ad = dom == 0
    rank_weight = np.zeros(cfg.ads)
    for c in range(n_cat):
        members = np.flatnonzero(ad_cat == c)
        rank_weight[members] = 1.0 / (1 + rng.permutation(len(members))) ** cfg.popularity_skew
        sel = np.flatnonzero(is_ad & (cat == c))
        p = rank_weight[members] / rank_weight[members].sum()
        ad[sel] = members[np.minimum(np.searchsorted(np.cumsum(p), rng.random(len(sel))),
                                     len(members) - 1)]

    title = np.full(n, -1, dtype=np.int64)
    content_sel = ~is_ad
    cs, ds = cat[content_sel], dom[content_sel]
    title[content_sel] = c_off[cs, ds] + (rng.random(len(cs)) * c_cnt[cs, ds]).astype(np.int64)

    # --- engagement: clicks follow interest in the ad's category; conversions follow clicks
    imp = np.flatnonzero(is_ad)
    interest_at = interests[user[imp], ad_cat[ad[imp]]]
    p_click = np.clip(cfg.click_base + cfg.click_slope * interest_at, 0.0, 0.95)
    clicked = imp[rng.random(len(imp)) < p_click]
    p_conv = cfg.conversion_rate * np.minimum(1.0, 2 * interests[user[clicked], ad_cat[ad[clicked]]])
    conv_mask = rng.random(len(clicked)) < p_conv
    converted = clicked[conv_mask]
    click_ts = ts[clicked] + rng.integers(2_000, 120_000, len(clicked))
    conv_ts = click_ts[conv_mask] + rng.integers(60_000, 3_600_000, len(converted))

    ACT = {"impression": 0, "click": 1, "conversion": 2, "play": 3, "read": 4}
    action = np.where(dom == 0, ACT["impression"], np.where(dom == 1, ACT["play"], ACT["read"]))
    user = np.concatenate([user, user[clicked], user[converted]])
    ts = np.concatenate([ts, click_ts, conv_ts])
    dom = np.concatenate([dom, np.zeros(len(clicked) + len(converted), dtype=dom.dtype)])
    action = np.concatenate([action, np.full(len(clicked), ACT["click"]),
                             np.full(len(converted), ACT["conversion"])])
    ad = np.concatenate([ad, ad[clicked], ad[converted]])
    title = np.concatenate([title, np.full(len(clicked) + len(converted), -1)])

    order = np.lexsort((ts, user))
    user, ts, dom, action, ad, title = (a[order] for a in (user, ts, dom, action, ad, title))
    events = pa.table({
        "user_id": users.column("user_id").combine_chunks().take(pa.array(user)),
        "ts": pa.array(ts, pa.int64()).cast(pa.timestamp("ms")).cast(schema.TS_TYPE),
        "domain": _take(list(DOMAINS), dom),
        "action": _take(list(ACT), action),
        "ad_id": _take(ads.column("ad_id").combine_chunks(), ad),
        "title": _take(content.column("title").combine_chunks(), title),
    }, schema=schema.EVENTS)
    if cfg.corrupt_share > 0:
        events = _corrupt(events, cfg, rng)
    return World(ads, users, events, interests, ad_cat, content, cats)


def _corrupt(events: pa.Table, cfg: SynthConfig, rng: np.random.Generator) -> pa.Table:
    """Append malformed copies of real rows, one kind of fault each, as real logs have:
    exact duplicates (client retries), unknown ads, unknown actions, missing users and
    timestamps from a broken clock."""
    k = max(1, int(cfg.corrupt_share * events.num_rows))
    bad = events.take(pa.array(rng.integers(events.num_rows, size=k))).to_pandas()
    kind = rng.integers(5, size=k)
    unknown_ad = kind == 1
    bad.loc[unknown_ad, ["domain", "action", "ad_id", "title"]] = ["ad", "click", "ad_unknown", None]
    bad.loc[kind == 2, "action"] = "share"
    bad.loc[kind == 3, "user_id"] = None
    bad.loc[kind == 4, "ts"] = pd.Timestamp("1971-01-01", tz="UTC")
    raw = schema.RAW_SCHEMAS["events"]
    return pa.concat_tables([events.cast(raw),
                             pa.Table.from_pandas(bad, schema=raw, preserve_index=False)])


def write_world(world: World, cfg: SynthConfig) -> dict[str, Any]:
    out = cfg.out
    for name in ("ads", "users", "events"):
        artifacts.write_table(getattr(world, name), out, name, cfg.rows_per_file)
    artifacts.write_table(pa.table({
        "user_id": world.users.column("user_id"),
        "interests": pa.FixedSizeListArray.from_arrays(
            pa.array(world.interests.astype(np.float32).ravel()), len(world.categories)),
    }), out, "latent/user_interests")
    artifacts.write_table(world.content, out, "latent/content")
    artifacts.write_table(pa.table({"category": world.categories}), out, "latent/categories")
    return {name: getattr(world, name).num_rows for name in ("ads", "users", "events")}


def load_latent(location: str) -> dict[str, Any]:
    """The latent truth of a generated world (for tests and benchmarks)."""
    cats = artifacts.read_table(location, "latent/categories").column("category").to_pylist()
    ui = artifacts.read_table(location, "latent/user_interests")
    interests = np.stack(ui.column("interests").to_numpy(zero_copy_only=False))
    content = artifacts.read_table(location, "latent/content")
    return {"categories": cats, "user_ids": ui.column("user_id").to_pylist(),
            "interests": interests,
            "content_category": dict(zip(content.column("title").to_pylist(),
                                         content.column("category").to_pylist()))}


def run(cfg: SynthConfig) -> dict[str, Any]:
    timings: dict[str, float] = {}
    with artifacts.timed(timings, "generate"):
        world = generate(cfg)
    with artifacts.timed(timings, "write"):
        counts = write_world(world, cfg)
    events = world.events.column("action").value_counts().to_pylist()
    counts["events_by_action"] = {d["values"]: d["counts"] for d in events}
    manifest = artifacts.write_manifest(cfg.out, "generate", inputs={}, config=cfg,
                                        counts=counts, timings=timings)
    manifest["summary"] = {"out": cfg.out, **counts, "seconds": round(sum(timings.values()), 2)}
    return manifest
