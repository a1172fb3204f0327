"""``SidTable``: the ad_id <-> Semantic ID contract between the catalog, the LLM and serving.

An S-ID is ``levels`` quantiser codes plus one disambiguation code, written as level-prefixed
tokens with no spaces: ``<a_12><b_6><c_22><d_36><e_0>``. Ads whose quantiser codes collide
get e = 0, 1, 2, ... in ad_id order, so every S-ID is unique and the assignment depends only
on (codes, ad_ids), never on row order.

Stored as parquet ``<dir>/sid_table/part-*.parquet`` with columns ad_id, codes (list<int32>),
sid (string), active (bool); table-level facts (version, token prefixes, codebook sizes) go in
the parquet schema metadata so the table is self-describing.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from leadre.artifacts import ArtifactError, read_table, write_table

TABLE_NAME = "sid_table"
META_KEY = b"leadre.sid_table"
# One S-ID token, ``<a_12>``: groups are the level prefix and the code. The one definition:
# tokenizers, prompt token estimates and parsing all use it.
SID_TOKEN = re.compile(r"<([a-z]+)_(\d+)>")
SCHEMA = pa.schema([
    pa.field("ad_id", pa.string(), nullable=False),
    pa.field("codes", pa.list_(pa.int32()), nullable=False),
    pa.field("sid", pa.string(), nullable=False),
    pa.field("active", pa.bool_(), nullable=False),
])


def default_prefixes(levels: int) -> list[str]:
    """``a, b, c, ...`` for the quantiser levels and the next letter for disambiguation."""
    return list(string.ascii_lowercase[:levels + 1])


def format_sid(codes: Sequence[int], prefixes: Sequence[str]) -> str:
    return "".join(f"<{p}_{int(c)}>" for p, c in zip(prefixes, codes))


def parse_sid(sid: str) -> list[tuple[str, int]]:
    """``"<a_1><b_2>"`` -> ``[("a", 1), ("b", 2)]``; raises ValueError on anything else."""
    parts = SID_TOKEN.findall(sid)
    if not parts or "".join(f"<{p}_{c}>" for p, c in parts) != sid:
        raise ValueError(f"{sid!r} is not an S-ID of the form <a_12><b_6>...")
    return [(p, int(c)) for p, c in parts]


def version_id(*parts: bytes) -> str:
    """Short content hash used as the S-ID version (12 hex digits of sha256)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:12]


def disambiguate(ad_ids: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Disambiguation code per ad: its rank, by ad_id, among ads with the same code tuple."""
    n = len(ad_ids)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    # Sort by (codes..., ad_id); rank = position minus the start of the run of equal codes.
    id_rank = np.unique(ad_ids.astype(str), return_inverse=True)[1]
    order = np.lexsort((id_rank, *codes.T[::-1]))
    sorted_codes = codes[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (sorted_codes[1:] != sorted_codes[:-1]).any(axis=1)
    starts = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    e = np.empty(n, dtype=np.int32)
    e[order] = np.arange(n) - starts
    return e


class SidTable:
    """Unique S-IDs for a catalog, with O(1) lookups both ways.

    Build with :meth:`from_codes` (quantiser output), :meth:`from_index_json` (bring your
    own) or :meth:`load`; query with :meth:`sid` / :meth:`sids` and :meth:`ad_id` /
    :meth:`ad_ids`; :meth:`tokens` lists the S-ID vocabulary for the tokenizer.
    """

    def __init__(self, ad_ids: np.ndarray, codes: np.ndarray, active: np.ndarray,
                 codebook_sizes: Sequence[int], prefixes: Sequence[str], version: str = ""):
        self.ad_id_array = np.asarray(ad_ids, dtype=object)
        self.codes = np.asarray(codes, dtype=np.int32).reshape(len(self.ad_id_array),
                                                               len(prefixes))
        self.active = np.asarray(active, dtype=bool).copy()
        self.codebook_sizes = [int(k) for k in codebook_sizes]  # one per token level, incl. e
        self.prefixes = list(prefixes)
        self.version = version
        if len(self.codebook_sizes) != len(self.prefixes):
            raise ArtifactError(f"S-ID table: {self.codes.shape[1]} code columns but prefixes "
                                f"{self.prefixes} and codebook sizes {self.codebook_sizes}")
        if len(self.codes) and ((self.codes < 0).any()
                                or (self.codes >= np.asarray(self.codebook_sizes)).any()):
            raise ArtifactError("S-ID table: a code is outside its codebook "
                                f"(sizes {self.codebook_sizes})")
        self._row_of_id = pd.Index(self.ad_id_array)
        if not self._row_of_id.is_unique:
            dup = self._row_of_id[self._row_of_id.duplicated()].unique()[:5].tolist()
            raise ArtifactError(f"S-ID table: duplicate ad_id(s) {dup}: every ad needs one S-ID")
        # S-ID -> row through a mixed-radix integer key: compact and vectorised.
        self._radix = np.cumprod([1, *self.codebook_sizes[:0:-1]])[::-1].astype(np.int64)
        if np.log2(np.prod(np.asarray(self.codebook_sizes, dtype=float))) >= 62:
            raise ArtifactError(f"S-ID table: codebook sizes {self.codebook_sizes} are too large")
        keys = (self.codes.astype(np.int64) @ self._radix if len(self.codes)
                else np.zeros(0, np.int64))
        self._key_order = np.argsort(keys, kind="stable")
        self._sorted_keys = keys[self._key_order]
        if len(keys) > 1 and (np.diff(self._sorted_keys) == 0).any():
            raise ArtifactError("S-ID table: two ads share an S-ID (disambiguation level missing)")
        self._level_of_prefix = {p: i for i, p in enumerate(self.prefixes)}

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_codes(cls, ad_ids: Sequence[str], codes: np.ndarray, codebook_sizes: Sequence[int],
                   active: Sequence[bool] | None = None, prefixes: Sequence[str] | None = None,
                   version: str = "") -> "SidTable":
        """Quantiser codes (n, levels) -> unique S-IDs by appending the disambiguation level."""
        ad_ids = np.asarray(list(ad_ids), dtype=object)
        levels = len(codebook_sizes)
        codes = np.asarray(codes, dtype=np.int64).reshape(len(ad_ids), levels)
        ids = pd.Index(ad_ids)
        if not ids.is_unique:
            dup = ids[ids.duplicated()].unique()[:5].tolist()
            raise ArtifactError(f"duplicate ad_id(s) {dup}: every ad needs one S-ID; "
                                "deduplicate the ads table (leadre ingest quarantines them)")
        e = disambiguate(ad_ids, codes)
        full = np.concatenate([codes, e[:, None]], axis=1)
        sizes = [*codebook_sizes, int(e.max()) + 1 if len(e) else 1]
        active = np.ones(len(ad_ids), bool) if active is None else np.asarray(active, bool)
        return cls(ad_ids, full, active, sizes, prefixes or default_prefixes(levels), version)

    @classmethod
    def from_index_json(cls, path: str | Path, active: dict[str, bool] | None = None
                        ) -> "SidTable":
        """Bring your own S-IDs: ``{"item_id": ["<a_1>", "<b_2>", ...]}`` (LC-Rec / LETTER /
        TIGER format). Token prefixes are taken from the file; a disambiguation level is
        appended (all zeros when the file is already collision-free)."""
        try:
            raw = Path(path).read_bytes()
            data = json.loads(raw)
        except FileNotFoundError:
            raise ArtifactError(f"index file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"index file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not data:
            raise ArtifactError(f"index file {path} must be a non-empty object "
                                '{"item_id": ["<a_1>", "<b_2>", ...]}')
        ad_ids = list(data)
        prefixes: list[str] | None = None
        codes = []
        for item, toks in data.items():
            try:
                if isinstance(toks, str):
                    toks = [f"<{p}_{c}>" for p, c in parse_sid(toks)]
                parsed = [parse_sid(t)[0] for t in toks]
            except (ValueError, TypeError):
                raise ArtifactError(f"index file {path}: item {item!r} has S-ID {toks!r}; "
                                    'expected a list like ["<a_1>", "<b_2>"]') from None
            p = [x[0] for x in parsed]
            if prefixes is None:
                prefixes = p
            elif p != prefixes:
                raise ArtifactError(f"index file {path}: item {item!r} has levels {p}, "
                                    f"others have {prefixes}")
            codes.append([x[1] for x in parsed])
        codes_a = np.asarray(codes, dtype=np.int64)
        if len(set(prefixes)) != len(prefixes):
            raise ArtifactError(f"index file {path}: repeated level prefix in {prefixes}")
        extra = next(c for c in string.ascii_lowercase if c not in prefixes)
        sizes = (codes_a.max(axis=0) + 1).tolist()
        act = None if active is None else [bool(active.get(a, False)) for a in ad_ids]
        return cls.from_codes(ad_ids, codes_a, sizes, act, [*prefixes, extra],
                              version=version_id(b"byo-index", raw))

    # --- lookups ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ad_id_array)

    @property
    def levels(self) -> int:
        """Token levels per S-ID, including the disambiguation level."""
        return self.codes.shape[1]

    def rows_of(self, ad_ids: Iterable[str]) -> np.ndarray:
        """Row index per ad_id, -1 when unknown."""
        return self._row_of_id.get_indexer(list(ad_ids))

    def sid(self, ad_id: str) -> str:
        row = self.rows_of([ad_id])[0]
        if row < 0:
            raise KeyError(f"ad_id {ad_id!r} has no S-ID (not in table version {self.version})")
        return format_sid(self.codes[row], self.prefixes)

    def sids(self, ad_ids: Iterable[str]) -> list[str | None]:
        """Batch ad_id -> S-ID string; None for unknown ads."""
        return [format_sid(self.codes[r], self.prefixes) if r >= 0 else None
                for r in self.rows_of(ad_ids)]

    def sid_tokens(self, ad_id: str) -> list[str]:
        return [f"<{p}_{c}>" for p, c in parse_sid(self.sid(ad_id))]

    def codes_of(self, sid: str | Sequence[str]) -> list[int] | None:
        """S-ID (string or token list) -> codes, or None when it is not a full S-ID here."""
        try:
            toks = parse_sid(sid if isinstance(sid, str) else "".join(sid))
        except ValueError:
            return None
        if [p for p, _ in toks] != self.prefixes:
            return None
        return [c for _, c in toks]

    def rows_of_sids(self, sids: Iterable[str | Sequence[str]]) -> np.ndarray:
        """Row index per S-ID, -1 when no ad has it (or it is malformed)."""
        sids = list(sids)
        parsed = [self.codes_of(s) for s in sids]
        ok = np.array([p is not None and all(0 <= c < k for c, k in zip(p, self.codebook_sizes))
                       for p in parsed], dtype=bool)
        rows = np.full(len(sids), -1, dtype=np.int64)
        if not ok.any() or not len(self._sorted_keys):
            return rows
        keys = np.asarray([p for p, good in zip(parsed, ok) if good], np.int64) @ self._radix
        pos = np.searchsorted(self._sorted_keys, keys).clip(max=len(self._sorted_keys) - 1)
        hit = self._sorted_keys[pos] == keys
        rows[np.flatnonzero(ok)] = np.where(hit, self._key_order[pos], -1)
        return rows

    def ad_id(self, sid: str | Sequence[str]) -> str:
        """The inverse lookup: S-ID -> ad_id (KeyError when no ad has this S-ID)."""
        row = self.rows_of_sids([sid])[0]
        if row < 0:
            raise KeyError(f"no ad has S-ID {sid!r} (version {self.version})")
        return self.ad_id_array[row]

    def ad_ids(self, sids: Iterable[str | Sequence[str]]) -> list[str | None]:
        """Batch S-ID -> ad_id; None for unknown or malformed S-IDs."""
        return [self.ad_id_array[r] if r >= 0 else None for r in self.rows_of_sids(sids)]

    def token(self, level: int, code: int) -> str:
        return f"<{self.prefixes[level]}_{int(code)}>"

    def tokens(self) -> list[str]:
        """Every S-ID token, level by level and code by code (all codebook entries, used or
        not, so re-assigning ads under the same codebooks needs no new tokens). This order
        defines the trie's default token ids."""
        return [self.token(lvl, c) for lvl, k in enumerate(self.codebook_sizes) for c in range(k)]

    def token_level_code(self, token: str) -> tuple[int, int] | None:
        """``"<b_6>"`` -> (1, 6); None when the token is not in this table's vocabulary."""
        m = SID_TOKEN.fullmatch(token)
        if not m or m.group(1) not in self._level_of_prefix:
            return None
        lvl, code = self._level_of_prefix[m.group(1)], int(m.group(2))
        return (lvl, code) if code < self.codebook_sizes[lvl] else None

    # --- active flags -------------------------------------------------------------------

    def set_active(self, ad_ids: Iterable[str], active: bool) -> int:
        """Switch ads on/off (no re-quantisation); returns how many rows changed. Unknown
        ad_ids raise KeyError."""
        ad_ids = list(ad_ids)
        rows = self.rows_of(ad_ids)
        if (rows < 0).any():
            raise KeyError(f"unknown ad_id(s) {[a for a, r in zip(ad_ids, rows) if r < 0][:5]}")
        changed = int((self.active[rows] != active).sum())
        self.active[rows] = active
        return changed

    # --- persistence --------------------------------------------------------------------

    def meta(self) -> dict:
        return {"version": self.version, "prefixes": self.prefixes,
                "codebook_sizes": self.codebook_sizes}

    def to_arrow(self) -> pa.Table:
        table = pa.table({
            "ad_id": pa.array(self.ad_id_array.tolist(), pa.string()),
            "codes": pa.array(self.codes.tolist(), pa.list_(pa.int32())),
            "sid": pa.array([format_sid(c, self.prefixes) for c in self.codes], pa.string()),
            "active": pa.array(self.active, pa.bool_()),
        }, schema=SCHEMA)
        return table.replace_schema_metadata({META_KEY: json.dumps(self.meta()).encode()})

    def save(self, location: str) -> str:
        return write_table(self.to_arrow(), location, TABLE_NAME)

    @classmethod
    def load(cls, location: str) -> "SidTable":
        """Read ``<location>/sid_table``; ArtifactError when missing or inconsistent."""
        table = read_table(location, TABLE_NAME)
        raw = (table.schema.metadata or {}).get(META_KEY)
        try:
            meta = json.loads(raw)
            prefixes, sizes = meta["prefixes"], meta["codebook_sizes"]
        except (TypeError, json.JSONDecodeError, KeyError):
            raise ArtifactError(f"{location}/{TABLE_NAME} lacks its S-ID metadata: "
                                "was it written by SidTable.save?") from None
        missing = {"ad_id", "codes", "active"} - set(table.column_names)
        if missing:
            raise ArtifactError(f"{location}/{TABLE_NAME} lacks column(s) {sorted(missing)}")
        ad_ids = np.asarray(table.column("ad_id").to_pylist(), dtype=object)
        codes_col = table.column("codes").combine_chunks()
        lengths = codes_col.value_lengths().to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != len(prefixes)).any():
            raise ArtifactError(f"{location}/{TABLE_NAME}: S-IDs must have {len(prefixes)} codes")
        codes = codes_col.flatten().to_numpy().reshape(len(ad_ids), len(prefixes))
        return cls(ad_ids, codes, table.column("active").to_numpy(zero_copy_only=False),
                   sizes, prefixes, meta.get("version", ""))
