"""Prefix trie over S-IDs for constrained decoding: "which tokens may follow this prefix?"

Flat-array layout (no Python objects per node, so 1M S-IDs fit in tens of MB):

- nodes are numbered depth by depth, and within a depth in lexicographic order of their
  prefix; node 0 is the root (empty prefix), the leaves (full S-IDs) are the last depth;
- the children of a node are therefore a contiguous, code-sorted run ``first_child[n] ..
  first_child[n] + n_children[n]``: listing them is a slice;
- ``key[n] = parent[n] * V + code[n]`` is globally sorted, so "child of n with code c" is one
  ``searchsorted`` for a whole batch of beams at once.

The trie holds every ad; ``active_count[n]`` counts active ads below n and only branches
with an active ad are offered. Switching ads on/off updates those counts along their paths
(O(depth) per ad), with no rebuild and no re-quantisation.

Token ids: by default a token's id is its index in ``SidTable.tokens()``. An LLM tokenizer
assigns its own ids to the S-ID tokens it added; pass its ``token -> id`` map
(``tokenizer.get_vocab()``) as ``vocab`` and every input and output is in tokenizer ids.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from leadre.sids.table import SidTable

ROOT = 0
DEAD = -1  # state after a token that no active S-ID continues with


class SidTrie:
    def __init__(self, codes: np.ndarray, active: np.ndarray, token_ids: list[np.ndarray]):
        """``codes``: (n, depth) S-ID codes, one row per ad (row order = ad row order);
        ``token_ids[d][c]``: the vocabulary id of code c at depth d."""
        n, depth = codes.shape
        self.depth = depth
        self.n_ads = n
        self.token_ids = [np.asarray(t, dtype=np.int64) for t in token_ids]
        # id -> code per depth (-1: not a token of this depth), for decoding model outputs.
        vocab_size = max((int(t.max()) + 1 for t in self.token_ids if len(t)), default=0)
        self.code_of_id = []
        for t in self.token_ids:
            inv = np.full(vocab_size, -1, dtype=np.int32)
            inv[t] = np.arange(len(t), dtype=np.int32)
            self.code_of_id.append(inv)
        self._radix = int(max((len(t) for t in self.token_ids), default=1))

        order = np.lexsort(codes.T[::-1]) if n else np.zeros(0, np.int64)
        sc = codes[order].astype(np.int64)
        parents_prev = np.zeros(n, dtype=np.int64)  # node of each sorted row at depth d-1
        new_prefix = np.zeros(n, dtype=bool)
        parent_parts, code_parts = [np.array([-1], np.int64)], [np.array([-1], np.int64)]
        self.depth_start = [0]
        next_id = 1
        for d in range(depth):
            # A row starts a new node at depth d+1 when its prefix of length d+1 differs.
            if n:
                new_prefix[0] = True
                new_prefix[1:] |= sc[1:, d] != sc[:-1, d]
            first_rows = np.flatnonzero(new_prefix)
            node_of_row = next_id + np.cumsum(new_prefix) - 1
            parent_parts.append(parents_prev[first_rows])
            code_parts.append(sc[first_rows, d])
            self.depth_start.append(next_id)
            next_id += len(first_rows)
            parents_prev = node_of_row
        self.depth_start.append(next_id)
        self.parent = np.concatenate(parent_parts).astype(np.int32)
        self.code = np.concatenate(code_parts).astype(np.int32)
        n_nodes = next_id
        self.key = self.parent[1:].astype(np.int64) * self._radix + self.code[1:]
        self.n_children = np.bincount(self.parent[1:], minlength=n_nodes).astype(np.int32)
        self.first_child = np.zeros(n_nodes, dtype=np.int32)
        # Children of node p start right after all children of nodes < p.
        self.first_child[:] = 1 + np.concatenate([[0], np.cumsum(self.n_children)[:-1]])
        # Leaf <-> ad row.
        self.leaf_row = order.astype(np.int64)
        self.row_leaf = np.empty(n, dtype=np.int64)
        self.row_leaf[order] = parents_prev if n else np.zeros(0, np.int64)
        if n and len(np.unique(self.row_leaf)) != n:
            raise ValueError("two ads share an S-ID: build the trie from a disambiguated table")
        self.active = np.zeros(n, dtype=bool)
        self.active_count = np.zeros(n_nodes, dtype=np.int32)
        self.set_active_rows(np.flatnonzero(active), True)

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_table(cls, table: SidTable, vocab: Mapping[str, int] | None = None) -> "SidTrie":
        """Trie over ``table`` (only its active ads are offered). ``vocab`` maps token strings
        to ids (e.g. ``tokenizer.get_vocab()``); default: index in ``table.tokens()``."""
        token_ids, offset = [], 0
        for lvl, k in enumerate(table.codebook_sizes):
            if vocab is None:
                token_ids.append(np.arange(offset, offset + k))
            else:
                missing = [t for t in (table.token(lvl, c) for c in range(k)) if t not in vocab]
                if missing:
                    raise KeyError(f"{len(missing)} S-ID token(s) missing from the vocabulary, "
                                   f"e.g. {missing[:3]}: add SidTable.tokens() to the tokenizer")
                token_ids.append(np.array([vocab[table.token(lvl, c)] for c in range(k)]))
            offset += k
        trie = cls(table.codes, table.active, token_ids)
        trie.table = table
        return trie

    # --- active flags -------------------------------------------------------------------

    def set_active_rows(self, rows: np.ndarray, active: bool) -> int:
        """Switch ads (by table row) on/off; returns how many changed."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        rows = rows[self.active[rows] != active]
        if not len(rows):
            return 0
        self.active[rows] = active
        nodes = self.row_leaf[rows]
        delta = 1 if active else -1
        for _ in range(self.depth + 1):  # the leaf, its ancestors, and the root
            np.add.at(self.active_count, nodes, delta)
            nodes = np.maximum(self.parent[nodes], 0)
        return len(rows)

    def set_active(self, ad_ids: Sequence[str], active: bool) -> int:
        """Switch ads on/off by ad_id (trie built with ``from_table``); the table's flags
        follow, so the table and trie stay consistent."""
        self.table.set_active(ad_ids, active)
        return self.set_active_rows(self.table.rows_of(ad_ids), active)

    # --- decoding -----------------------------------------------------------------------

    def node_depth(self, nodes: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.depth_start, nodes, side="right") - 1

    def step(self, nodes: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
        """Advance a batch of states by one token each; DEAD when the token leaves the trie
        of active S-IDs (or the state is DEAD / already a full S-ID)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        token_ids = np.asarray(token_ids, dtype=np.int64)
        out = np.full(len(nodes), DEAD, dtype=np.int64)
        depth = self.node_depth(np.maximum(nodes, 0))
        ok = (nodes >= 0) & (depth < self.depth)
        codes = np.full(len(nodes), -1, dtype=np.int64)
        for d in np.unique(depth[ok]):
            sel = ok & (depth == d)
            ids = token_ids[sel]
            inv = self.code_of_id[d]
            inside = (ids >= 0) & (ids < len(inv))
            codes[sel] = np.where(inside, inv[np.clip(ids, 0, len(inv) - 1)], -1)
        ok &= codes >= 0
        if not ok.any() or not len(self.key):
            return out
        q = nodes[ok] * self._radix + codes[ok]
        pos = np.searchsorted(self.key, q).clip(max=len(self.key) - 1)
        child = pos + 1
        good = (self.key[pos] == q) & (self.active_count[child] > 0)
        out[np.flatnonzero(ok)] = np.where(good, child, DEAD)
        return out

    def walk(self, prefixes: Sequence[Sequence[int]]) -> np.ndarray:
        """States after consuming each prefix (token ids) from the root."""
        nodes = np.zeros(len(prefixes), dtype=np.int64)
        longest = max((len(p) for p in prefixes), default=0)
        for i in range(longest):
            has = np.array([len(p) > i for p in prefixes])
            tok = np.array([p[i] if len(p) > i else -1 for p in prefixes], dtype=np.int64)
            nodes = np.where(has, self.step(nodes, tok), nodes)
        return nodes

    def _children(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(batch index, child node) pairs of the active children of each state."""
        nodes = np.asarray(nodes, dtype=np.int64)
        live = nodes >= 0
        counts = np.where(live, self.n_children[np.maximum(nodes, 0)], 0)
        starts = self.first_child[np.maximum(nodes, 0)]
        batch = np.repeat(np.arange(len(nodes)), counts)
        offs = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        child = np.repeat(starts, counts) + offs
        keep = self.active_count[child] > 0
        return batch[keep], child[keep]

    def allowed(self, nodes: np.ndarray) -> list[np.ndarray]:
        """Per state, the sorted-by-code token ids that continue an active S-ID (empty for
        DEAD states and complete S-IDs)."""
        batch, child = self._children(nodes)
        depth = self.node_depth(child) - 1 if len(child) else child
        ids = np.empty(len(child), dtype=np.int64)
        for d in np.unique(depth):
            sel = depth == d
            ids[sel] = self.token_ids[d][self.code[child[sel]]]
        return np.split(ids, np.searchsorted(batch, np.arange(1, len(nodes))))

    def allowed_mask(self, nodes: np.ndarray, vocab_size: int) -> np.ndarray:
        """(batch, vocab_size) boolean mask of allowed next tokens, for logits masking."""
        mask = np.zeros((len(nodes), vocab_size), dtype=bool)
        batch, child = self._children(nodes)
        depth = self.node_depth(child) - 1
        for d in np.unique(depth):
            sel = depth == d
            mask[batch[sel], self.token_ids[d][self.code[child[sel]]]] = True
        return mask

    def node_of(self, prefix: Sequence[int]) -> int:
        """State after ``prefix`` (token ids), walked with scalar lookups: the fast path for
        one prefix (the batched ``walk`` pays numpy overhead per call)."""
        node = ROOT
        for d, t in enumerate(prefix):
            inv = self.code_of_id[d] if d < self.depth else ()
            code = inv[t] if 0 <= t < len(inv) else -1
            if code < 0:
                return DEAD
            lo = self.first_child[node]
            hi = lo + self.n_children[node]
            j = lo + int(np.searchsorted(self.code[lo:hi], code))
            if j >= hi or self.code[j] != code or self.active_count[j] == 0:
                return DEAD
            node = j
        return node

    def next_tokens(self, prefix: Sequence[int]) -> np.ndarray:
        """Token ids that may follow ``prefix`` (token ids), sorted by code."""
        node = self.node_of(prefix)
        if node == DEAD:
            return np.zeros(0, dtype=np.int64)
        lo = self.first_child[node]
        hi = lo + self.n_children[node]
        live = lo + np.flatnonzero(self.active_count[lo:hi] > 0)
        d = len(prefix)
        return self.token_ids[d][self.code[live]] if d < self.depth else live

    def next_tokens_batch(self, prefixes: Sequence[Sequence[int]]) -> list[np.ndarray]:
        return self.allowed(self.walk(prefixes))

    def is_complete(self, nodes: np.ndarray) -> np.ndarray:
        nodes = np.asarray(nodes, dtype=np.int64)
        return (nodes >= self.depth_start[-2]) & (nodes < self.depth_start[-1])

    def rows(self, nodes: np.ndarray) -> np.ndarray:
        """Table row of the ad at each complete state; -1 elsewhere."""
        nodes = np.asarray(nodes, dtype=np.int64)
        leaf = self.is_complete(nodes)
        out = np.full(len(nodes), -1, dtype=np.int64)
        out[leaf] = self.leaf_row[nodes[leaf] - self.depth_start[-2]]
        return out

    @property
    def n_nodes(self) -> int:
        return len(self.parent)

    def nbytes(self) -> int:
        arrays = [self.parent, self.code, self.key, self.n_children, self.first_child,
                  self.leaf_row, self.row_leaf, self.active, self.active_count,
                  *self.token_ids, *self.code_of_id]
        return int(sum(a.nbytes for a in arrays))
