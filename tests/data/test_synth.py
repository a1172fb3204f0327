"""The synthetic world: deterministic, valid, and with the latent signal the task needs."""

import numpy as np
import pyarrow.compute as pc
import pytest

from leadre.data import schema
from leadre.config import ConfigError
from leadre.data.config import SynthConfig
from leadre.data.synth import generate, load_latent, run


@pytest.fixture(scope="module")
def world():
    return generate(SynthConfig(users=3000, ads=800, seed=7))


def test_deterministic_for_a_seed():
    a = generate(SynthConfig(users=200, ads=100, seed=3))
    b = generate(SynthConfig(users=200, ads=100, seed=3))
    c = generate(SynthConfig(users=200, ads=100, seed=4))
    for name in ("ads", "users", "events"):
        assert getattr(a, name).equals(getattr(b, name))
    assert not a.events.equals(c.events)


def test_tables_match_the_schemas_and_pass_validation(world):
    assert world.ads.schema == schema.ADS
    assert world.users.schema == schema.USERS
    assert world.events.schema == schema.EVENTS
    known = set(world.ads.column("ad_id").to_pylist())
    assert schema.validate_events(world.events, known).quarantine.num_rows == 0
    assert schema.validate_ads(world.ads).quarantine.num_rows == 0
    assert schema.flag_duplicate_events(world.events).quarantine.num_rows == 0


def _clicks(world):
    ev = world.events.filter(pc.equal(world.events.column("action"), "click"))
    users = np.array([int(u[1:]) for u in ev.column("user_id").to_pylist()])
    ad_idx = np.array([int(a[2:]) for a in ev.column("ad_id").to_pylist()])
    return users, world.ad_category[ad_idx]


def test_clicks_follow_latent_interests(world):
    users, cats = _clicks(world)
    top3 = np.argsort(-world.interests, axis=1)[:, :3]
    share = np.mean([c in top3[u] for u, c in zip(users, cats)])
    chance = 3 / len(world.categories)
    assert share > 3 * chance, (share, chance)


def test_content_domain_predicts_ad_categories(world):
    """The most frequent category of a user's videos/news equals the category they click most
    far more often than for a random other user (a permutation baseline)."""
    latent_cat = {t: c for t, c in zip(world.content.column("title").to_pylist(),
                                       world.content.column("category").to_pylist())}
    cat_idx = {c: i for i, c in enumerate(world.categories)}
    n_users, n_cat = len(world.interests), len(world.categories)
    content = np.zeros((n_users, n_cat))
    ev = world.events.filter(pc.is_valid(world.events.column("title")))
    for u, t in zip(ev.column("user_id").to_pylist(), ev.column("title").to_pylist()):
        content[int(u[1:]), cat_idx[latent_cat[t]]] += 1
    clicks = np.zeros((n_users, n_cat))
    users, cats = _clicks(world)
    np.add.at(clicks, (users, cats), 1)
    has = (content.sum(1) > 0) & (clicks.sum(1) > 0)
    top_content, top_click = content[has].argmax(1), clicks[has].argmax(1)
    agree = np.mean(top_content == top_click)
    shuffled = np.mean(np.random.default_rng(0).permutation(top_content) == top_click)
    assert agree > 3 * shuffled, (agree, shuffled)


def test_profiles_carry_interest_signal(world):
    """Predicting a user's top interest from their industry+gender beats the global mode."""
    users = world.users.to_pandas()
    top = world.interests.argmax(1)
    key = users["industry"].fillna("?") + "|" + users["gender"].fillna("?")
    half = len(users) // 2
    train = users.index < half
    modes = {k: np.bincount(top[(key == k) & train], minlength=len(world.categories)).argmax()
             for k in key[train].unique()}
    global_mode = np.bincount(top[train]).argmax()
    test_idx = np.flatnonzero(~train)
    by_profile = np.mean([modes.get(key[i], global_mode) == top[i] for i in test_idx])
    by_global = np.mean(top[test_idx] == global_mode)
    assert by_profile > 1.5 * by_global, (by_profile, by_global)


def test_ecpm_varies_within_category(world):
    df = world.ads.to_pandas()
    cv = df.groupby("category")["ecpm"].agg(lambda s: s.std() / s.mean())
    assert (cv > 0.3).all(), cv
    assert df["active"].mean() == pytest.approx(0.9, abs=0.05)


def test_ad_text_is_category_coherent(world):
    from leadre.data.vocab import CATEGORIES
    for title, cat in zip(world.ads.column("title").to_pylist()[:200],
                          world.ads.column("category").to_pylist()[:200]):
        assert any(noun in title for noun in CATEGORIES[cat][0]), (title, cat)


def test_run_writes_tables_and_latent_truth(tmp_path):
    m = run(SynthConfig(out=str(tmp_path / "w"), users=100, ads=50, corrupt_share=0.05))
    assert m["stage"] == "generate" and m["counts"]["users"] == 100
    latent = load_latent(str(tmp_path / "w"))
    assert latent["interests"].shape == (100, len(latent["categories"]))
    assert np.allclose(latent["interests"].sum(1), 1, atol=1e-4)


@pytest.mark.parametrize("bad", [{"users": 0}, {"ads": 3}, {"ad_share": 1.5},
                                 {"ad_share": 0.8, "video_share": 0.5}, {"start": "yesterday"},
                                 {"min_events": 50, "mean_events": 10}])
def test_config_rejects_impossible_values(bad):
    with pytest.raises(ConfigError):
        SynthConfig(**bad)
