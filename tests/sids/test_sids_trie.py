"""The active-ad prefix trie against a brute-force reference on random catalogs."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from leadre.sids import DEAD, ROOT, SidTable, SidTrie


def brute_next(table: SidTable, prefix_codes: list[int]) -> set[int]:
    """Codes that follow ``prefix_codes`` in some active S-ID (linear scan)."""
    d = len(prefix_codes)
    rows = np.flatnonzero(table.active)
    hits = [r for r in rows if list(table.codes[r, :d]) == prefix_codes]
    return {int(table.codes[r, d]) for r in hits} if d < table.levels else set()


def ids(table: SidTable, level: int, codes) -> set[int]:
    offset = sum(table.codebook_sizes[:level])
    return {offset + int(c) for c in codes}


@st.composite
def catalogs(draw):
    levels = draw(st.integers(1, 3))
    k = draw(st.integers(2, 5))
    n = draw(st.integers(0, 60))
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, k, size=(n, levels))
    active = rng.random(n) < draw(st.floats(0.0, 1.0))
    return SidTable.from_codes([f"ad{i}" for i in range(n)], codes, [k] * levels, active), rng


def check_against_brute_force(table: SidTable, trie: SidTrie, rng) -> None:
    # Every prefix of every S-ID (active or not) plus random prefixes, as one batch.
    depths = range(table.levels + 1)
    prefixes = [list(table.codes[r, :d]) for r in range(len(table)) for d in depths]
    top = max(table.codebook_sizes)
    prefixes += [list(rng.integers(0, top, size=rng.integers(0, table.levels + 1)))
                 for _ in range(20)]
    token_prefixes = [[sum(table.codebook_sizes[:lvl]) + int(c) for lvl, c in enumerate(p)]
                      for p in prefixes]
    allowed = trie.next_tokens_batch(token_prefixes)
    states = trie.walk(token_prefixes)
    mask = trie.allowed_mask(states, len(table.tokens()))
    for p, tp, got, state, m in zip(prefixes, token_prefixes, allowed, states, mask):
        ok_prefix = all(c < k for c, k in zip(p, table.codebook_sizes))
        expect = brute_next(table, [int(c) for c in p]) if ok_prefix else set()
        expect_ids = ids(table, len(p), expect)
        live = any(list(table.codes[r, :len(p)]) == list(p) for r in np.flatnonzero(table.active))
        if not live and len(p) > 0:
            assert state == DEAD
        assert set(got.tolist()) == expect_ids, (p, got, expect_ids)
        assert set(np.flatnonzero(m).tolist()) == expect_ids
        assert list(got) == sorted(got)
        assert trie.next_tokens(tp).tolist() == got.tolist()  # scalar fast path agrees
    # Complete active S-IDs map back to their ad; inactive ones are unreachable.
    full = [[sum(table.codebook_sizes[:lvl]) + int(c) for lvl, c in enumerate(row)]
            for row in table.codes]
    states = trie.walk(full)
    rows = trie.rows(states)
    for r in range(len(table)):
        if table.active[r]:
            assert trie.is_complete(states[[r]])[0] and rows[r] == r
        else:
            assert states[r] == DEAD and rows[r] == -1


@settings(max_examples=60, deadline=None)
@given(catalogs())
def test_trie_matches_brute_force(catalog):
    table, rng = catalog
    trie = SidTrie.from_table(table)
    check_against_brute_force(table, trie, rng)


@settings(max_examples=40, deadline=None)
@given(catalogs(), st.data())
def test_trie_updates_on_active_flag_changes(catalog, data):
    """Switching ads on/off updates the trie in place; it then equals a fresh rebuild."""
    table, rng = catalog
    trie = SidTrie.from_table(table)
    for _ in range(3):
        if not len(table):
            break
        pick = data.draw(st.lists(st.integers(0, len(table) - 1), max_size=10))
        flag = data.draw(st.booleans())
        trie.set_active(table.ad_id_array[pick].tolist(), flag)
        assert table.active[pick].all() == flag or not pick
        check_against_brute_force(table, trie, rng)
        fresh = SidTrie.from_table(table)
        assert np.array_equal(fresh.active_count, trie.active_count)


def test_trie_with_tokenizer_vocabulary():
    """Ids can be a tokenizer's: pass its token -> id map (e.g. tokenizer.get_vocab())."""
    codes = np.array([[0, 1], [0, 2], [1, 1]])
    table = SidTable.from_codes(["x", "y", "z"], codes, [2, 3])
    rng = np.random.default_rng(0)
    base = 50_000
    vocab = {t: base + int(i) for t, i in zip(table.tokens(), rng.permutation(len(table.tokens())))}
    vocab["hello"] = 7
    trie = SidTrie.from_table(table, vocab)
    first = trie.next_tokens([])
    assert sorted(first.tolist()) == sorted([vocab["<a_0>"], vocab["<a_1>"]])
    assert sorted(trie.next_tokens([vocab["<a_0>"]]).tolist()) == sorted(
        [vocab["<b_1>"], vocab["<b_2>"]])
    s = trie.walk([[vocab[t] for t in table.sid_tokens("y")]])
    assert table.ad_id_array[trie.rows(s)[0]] == "y"
    # A non-S-ID token, or an S-ID token at the wrong depth, kills the beam.
    assert trie.step(np.array([ROOT, ROOT]), np.array([7, vocab["<b_1>"]])).tolist() == [DEAD, DEAD]
    mask = trie.allowed_mask(np.array([ROOT]), base + 20)
    assert mask.sum() == 2 and mask[0, vocab["<a_1>"]]
    try:
        SidTrie.from_table(table, {"<a_0>": 1})
    except KeyError as e:
        assert "missing from the vocabulary" in str(e)
    else:
        raise AssertionError("a vocabulary without the S-ID tokens must be rejected")


def test_empty_and_all_inactive():
    table = SidTable.from_codes([], np.zeros((0, 2)), [4, 4])
    trie = SidTrie.from_table(table)
    assert trie.next_tokens([]).size == 0 and trie.n_nodes == 1
    table = SidTable.from_codes(["a", "b"], np.array([[0, 0], [1, 1]]), [2, 2], [False, False])
    trie = SidTrie.from_table(table)
    assert trie.next_tokens([]).size == 0
    trie.set_active(["b"], True)
    assert trie.next_tokens([]).tolist() == [1]
