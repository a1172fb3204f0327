"""The data model: pyarrow schemas of the three input tables and their row validation.

This module owns the contract of stage 1, ingest. Every later stage reads tables with exactly
these schemas. Validation is vectorised over a batch and never raises on
bad data: each row either comes out typed and clean, or goes to the quarantine table with a
machine-readable reason and the original row as JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum

import numpy as np
import pandas as pd
import pyarrow as pa

from leadre.artifacts import ArtifactError
from leadre.data.coerce import COERCE, TS_TYPE

ADS = pa.schema(
    [
        pa.field("ad_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("description", pa.string()),
        pa.field("category", pa.string(), nullable=False),
        pa.field("advertiser", pa.string()),
        pa.field("ecpm", pa.float64()),
        pa.field("active", pa.bool_(), nullable=False),
    ]
)

USERS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("age", pa.int32()),
        pa.field("gender", pa.string()),
        pa.field("city", pa.string()),
        pa.field("education", pa.string()),
        pa.field("industry", pa.string()),
    ]
)

EVENTS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("ts", TS_TYPE, nullable=False),
        pa.field("domain", pa.string(), nullable=False),
        pa.field("action", pa.string(), nullable=False),
        pa.field("ad_id", pa.string()),
        pa.field("title", pa.string()),
    ]
)

QUARANTINE = pa.schema(
    [
        pa.field("table", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("row", pa.string(), nullable=False),  # the original row, as JSON
    ]
)

SCHEMAS: dict[str, pa.Schema] = {"ads": ADS, "users": USERS, "events": EVENTS}
# Raw logs may hold nulls anywhere; validation is what enforces the strict schemas above.
RAW_SCHEMAS: dict[str, pa.Schema] = {
    name: pa.schema([f.with_nullable(True) for f in s]) for name, s in SCHEMAS.items()}

# Which actions are legal in which domain. Ad events carry an ad_id, content events a title.
DOMAIN_ACTIONS: dict[str, frozenset[str]] = {
    "ad": frozenset({"impression", "click", "conversion"}),
    "video": frozenset({"play"}),
    "news": frozenset({"read"}),
}
ACTIONS: frozenset[str] = frozenset().union(*DOMAIN_ACTIONS.values())
_LEGAL_PAIRS = np.array([f"{d}|{a}" for d, acts in DOMAIN_ACTIONS.items() for a in acts])
# Actions that count as engagement with an ad (the targets the LLM learns to predict);
# ENGAGE is the ordered form, for arrow and pandas filters.
ENGAGE: tuple[str, ...] = ("click", "conversion")
ENGAGEMENTS: frozenset[str] = frozenset(ENGAGE)
# The optional profile attributes of a user: every USERS column but the key.
PROFILE_FIELDS: tuple[str, ...] = tuple(f.name for f in USERS if f.name != "user_id")
MS_PER_DAY = 86_400_000  # timestamps inside the stages are epoch milliseconds

# The id rule, owned here and nowhere else: the serving API refuses a user_id outside it
# (:mod:`leadre.serve.api` imports it), so ingest quarantines any user_id / ad_id outside it
# (``bad_id``): a row serving could never answer must not reach a clean table. The real
# datasets' ids (Amazon ASINs, LC-Rec's numeric ids) and the synthetic world's fit it.
ID_MAX_CHARS = 128
ID_PATTERN = rf"[A-Za-z0-9_.:@-]{{1,{ID_MAX_CHARS}}}"
ID_RE = re.compile(ID_PATTERN)
# The columns the rule applies to (every key column of the three tables).
ID_COLUMNS: frozenset[str] = frozenset({"user_id", "ad_id"})


def is_valid_id(value: object) -> bool:
    """Whether ``value`` is an id serving accepts: a string matching :data:`ID_PATTERN`."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


def bad_id_detail(column: str, value: object) -> str:
    """The quarantine detail of an id outside the rule: the column, the value (cut at 40
    characters, with its length when longer) and the rule itself."""
    text = str(value)
    shown = repr(text) if len(text) <= 40 else f"{text[:40]!r}... ({len(text):,} characters)"
    return f"{column} {shown} is not {ID_PATTERN} (the id rule of the serving API)"


class Reason(str, Enum):
    """Why a row went to quarantine. The value is what the quarantine table stores."""

    MISSING_FIELD = "missing_required_field"
    WRONG_TYPE = "wrong_type"
    INVALID_VALUE = "invalid_value"
    UNKNOWN_DOMAIN = "unknown_domain"
    UNKNOWN_ACTION = "unknown_action"
    ACTION_DOMAIN_MISMATCH = "action_domain_mismatch"
    UNKNOWN_AD_ID = "unknown_ad_id"
    TS_OUT_OF_RANGE = "timestamp_out_of_range"
    DUPLICATE_ID = "duplicate_id"
    DUPLICATE_EVENT = "duplicate_event"
    TEXT_TOO_LONG = "text_too_long"
    BAD_ID = "bad_id"  # outside ID_PATTERN, the id rule serving enforces


class SchemaError(ArtifactError):
    """A whole input table (or file) does not match its schema: no row of it can be valid, so
    this is a broken upstream to report, not dirty rows to quarantine."""


# Columns a table cannot do without. Other columns may be absent and read as null.
REQUIRED: dict[str, tuple[str, ...]] = {
    "ads": ("ad_id", "title", "category", "active"),
    "users": ("user_id",),
    "events": ("user_id", "ts", "domain", "action"),
}


@dataclass(frozen=True)
class TextLimits:
    """Longest accepted value, in characters, of each kind of text column. A longer value is
    quarantined (``text_too_long``), not truncated: a 200k-character title is a broken record
    (concatenated rows, binary junk), and cutting it would silently give the ad a made-up text
    and S-ID; the quarantine keeps the row for inspection. The defaults sit well above real
    catalogs (Amazon Scientific: longest title 496, description 1,996 characters). Ids have
    no limit here: their length is part of the id rule (:data:`ID_PATTERN`, ``bad_id``)."""

    titles: int = 1_000
    descriptions: int = 20_000
    fields: int = 256  # category, advertiser, profile attributes, domain, action

    def limit(self, column: str) -> int | None:
        """The limit of ``column``; None for the id columns."""
        if column in ID_COLUMNS:
            return None
        return {"title": self.titles, "description": self.descriptions}.get(column, self.fields)


def check_columns(name: str, file_schema: pa.Schema, source: str) -> None:
    """Raise :class:`SchemaError` if ``source`` (a file of table ``name``) lacks a required
    column."""
    missing = [c for c in REQUIRED[name] if c not in file_schema.names]
    if missing:
        raise SchemaError(f"{name} table: {source} has no column {', '.join(map(repr, missing))} "
                          f"(required: {', '.join(REQUIRED[name])}; found: "
                          f"{', '.join(file_schema.names) or 'none'})")


@dataclass(frozen=True)
class TimeRange:
    """Accepted event timestamps, inclusive, in UTC."""

    start: datetime = datetime(2000, 1, 1, tzinfo=timezone.utc)
    end: datetime = datetime(2100, 1, 1, tzinfo=timezone.utc)


# ---------------------------------------------------------------------------------------


class _Rejects:
    """First reason wins: a row is reported once, with the earliest check it failed."""

    def __init__(self, n: int):
        self.reason = np.full(n, None, dtype=object)
        self.detail = np.full(n, None, dtype=object)

    def add(self, mask: np.ndarray, reason: Reason, detail) -> None:
        new = mask & (self.reason == None)  # noqa: E711 - elementwise on an object array
        if not new.any():
            return
        self.reason[new] = reason.value
        if callable(detail):
            idx = np.flatnonzero(new)
            self.detail[idx] = [detail(i) for i in idx]
        else:
            self.detail[new] = detail

    @property
    def mask(self) -> np.ndarray:
        return self.reason != None  # noqa: E711


def _to_frame(batch: pa.Table | pd.DataFrame | dict) -> pd.DataFrame:
    if isinstance(batch, pa.Table):
        return batch.to_pandas(types_mapper=None)
    if isinstance(batch, dict):
        return pd.DataFrame({k: list(v) for k, v in batch.items()})
    return batch


def _row_json(df: pd.DataFrame, idx: np.ndarray) -> list[str]:
    rows = df.iloc[idx].to_dict(orient="records")
    return [json.dumps(r, default=str, ensure_ascii=False) for r in rows]


@dataclass
class Validated:
    """One validated batch: clean rows in the table's schema, rejected rows in QUARANTINE."""

    clean: pa.Table
    quarantine: pa.Table


def _quarantine_table(name: str, df: pd.DataFrame, rej: _Rejects) -> pa.Table:
    idx = np.flatnonzero(rej.mask)
    return pa.table(
        {
            "table": pa.array([name] * len(idx), pa.string()),
            "reason": pa.array(rej.reason[idx].tolist(), pa.string()),
            "detail": pa.array(rej.detail[idx].tolist(), pa.string()),
            "row": pa.array(_row_json(df, idx), pa.string()),
        },
        schema=QUARANTINE,
    )


def _typed_columns(name: str, df: pd.DataFrame, rej: _Rejects, limits: TextLimits
                   ) -> dict[str, pd.Series]:
    """Coerce every schema column; record wrong types, missing values and over-long text."""
    schema = SCHEMAS[name]
    n = len(df)
    cols: dict[str, pd.Series] = {}
    for field in schema:
        if field.name not in df.columns:
            raw = pd.Series([None] * n, dtype=object, index=df.index)
        else:
            raw = df[field.name]
        typed, bad = COERCE[field.type](raw.reset_index(drop=True))
        rej.add(bad, Reason.WRONG_TYPE, lambda i, f=field, r=raw: (
            f"{f.name}: expected {f.type}, got {type(r.iloc[i]).__name__} {r.iloc[i]!r:.60}"))
        cols[field.name] = typed
        limit = limits.limit(field.name) if field.type == pa.string() else None
        if limit is not None:
            n_chars = typed.str.len().fillna(0).to_numpy()
            rej.add(n_chars > limit, Reason.TEXT_TOO_LONG, lambda i, f=field.name, c=n_chars, k=limit: (
                f"{f} has {int(c[i]):,} characters (limit {k:,})"))
    for col in REQUIRED[name]:
        missing = cols[col].isna().to_numpy().copy()
        if schema.field(col).type == pa.string():
            missing |= (cols[col].fillna("").astype(str).str.strip() == "").to_numpy()
        rej.add(missing, Reason.MISSING_FIELD, f"{col} is required")
    for col in sorted(ID_COLUMNS & set(cols)):  # after missing: a blank id is missing, not bad
        ids = cols[col]
        bad = (ids.notna() & ~ids.astype(object).fillna("").astype(str).str.fullmatch(ID_PATTERN)
               ).to_numpy(dtype=bool)
        rej.add(bad, Reason.BAD_ID, lambda i, c=col, v=ids: bad_id_detail(c, v.iloc[i]))
    return cols


def _clean_table(name: str, cols: dict[str, pd.Series], keep: np.ndarray) -> pa.Table:
    schema = SCHEMAS[name]
    arrays = []
    for field in schema:
        arrays.append(pa.array(cols[field.name][keep], type=field.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=schema)


def validate_ads(batch: pa.Table | pd.DataFrame, limits: TextLimits = TextLimits()) -> Validated:
    """Type and value checks on one batch of ads. Duplicate ids need the whole table: see
    :func:`flag_duplicate_keys`."""
    df = _to_frame(batch).reset_index(drop=True)
    rej = _Rejects(len(df))
    cols = _typed_columns("ads", df, rej, limits)
    ecpm = cols["ecpm"].to_numpy(dtype=float, na_value=np.nan)
    rej.add(np.isinf(ecpm) | (ecpm < 0), Reason.INVALID_VALUE,
            lambda i: f"ecpm must be a finite number >= 0, got {ecpm[i]}")
    return Validated(_clean_table("ads", cols, ~rej.mask), _quarantine_table("ads", df, rej))


def validate_users(batch: pa.Table | pd.DataFrame, max_age: int = 120,
                   limits: TextLimits = TextLimits()) -> Validated:
    df = _to_frame(batch).reset_index(drop=True)
    rej = _Rejects(len(df))
    cols = _typed_columns("users", df, rej, limits)
    age = cols["age"].to_numpy(dtype=float, na_value=np.nan)
    rej.add((age < 0) | (age > max_age), Reason.INVALID_VALUE,
            lambda i: f"age must be in [0, {max_age}], got {age[i]:g}")
    return Validated(_clean_table("users", cols, ~rej.mask), _quarantine_table("users", df, rej))


def validate_events(
    batch: pa.Table | pd.DataFrame,
    known_ad_ids: set[str] | frozenset[str] | None = None,
    time_range: TimeRange = TimeRange(),
    limits: TextLimits = TextLimits(),
) -> Validated:
    """Row checks on one batch of events. ``known_ad_ids`` is the clean ads' id set (None
    skips the reference check). Duplicates need all of a user's events: see
    :func:`flag_duplicate_events`."""
    df = _to_frame(batch).reset_index(drop=True)
    rej = _Rejects(len(df))
    cols = _typed_columns("events", df, rej, limits)
    domain = cols["domain"].fillna("").to_numpy(dtype=object)
    action = cols["action"].fillna("").to_numpy(dtype=object)
    ad_id = cols["ad_id"]
    title = cols["title"]
    known_domain = np.isin(domain, list(DOMAIN_ACTIONS))
    rej.add(~known_domain, Reason.UNKNOWN_DOMAIN,
            lambda i: f"domain {domain[i]!r} not in {sorted(DOMAIN_ACTIONS)}")
    rej.add(~np.isin(action, list(ACTIONS)), Reason.UNKNOWN_ACTION,
            lambda i: f"action {action[i]!r} not in {sorted(ACTIONS)}")
    legal = np.isin(domain.astype(str) + "|" + action.astype(str), _LEGAL_PAIRS)
    rej.add(~legal, Reason.ACTION_DOMAIN_MISMATCH,
            lambda i: f"action {action[i]!r} is not valid in domain {domain[i]!r}")
    is_ad = domain == "ad"
    rej.add(is_ad & ad_id.isna().to_numpy(), Reason.MISSING_FIELD, "ad_id is required for ad events")
    no_title = title.fillna("").astype(str).str.strip().to_numpy() == ""
    rej.add(~is_ad & known_domain & no_title, Reason.MISSING_FIELD,
            "title is required for content events")
    if known_ad_ids is not None:
        ids = ad_id.to_numpy(dtype=object)
        unknown = is_ad & ad_id.notna().to_numpy() & ~ad_id.isin(known_ad_ids).to_numpy()
        rej.add(unknown, Reason.UNKNOWN_AD_ID, lambda i: f"ad_id {ids[i]!r} is not in the ads table")
    ts = cols["ts"]
    lo, hi = pd.Timestamp(time_range.start), pd.Timestamp(time_range.end)
    out = ts.notna().to_numpy() & ((ts < lo) | (ts > hi)).fillna(False).to_numpy(dtype=bool)
    rej.add(out, Reason.TS_OUT_OF_RANGE,
            lambda i: f"ts {ts.iloc[i]} outside [{lo.isoformat()}, {hi.isoformat()}]")
    return Validated(_clean_table("events", cols, ~rej.mask), _quarantine_table("events", df, rej))


def flag_duplicate_keys(table: pa.Table, name: str, key: str) -> Validated:
    """Keep the first row of each key; later rows with the same key go to quarantine."""
    df = table.to_pandas()
    dup = df.duplicated(subset=[key], keep="first").to_numpy()
    rej = _Rejects(len(df))
    keys = df[key].to_numpy(dtype=object)
    rej.add(dup, Reason.DUPLICATE_ID, lambda i: f"{key} {keys[i]!r} appears more than once")
    return Validated(table.filter(pa.array(~dup)), _quarantine_table(name, df, rej))


EVENT_IDENTITY = ("user_id", "ts", "domain", "action", "ad_id", "title")


def flag_duplicate_events(table: pa.Table) -> Validated:
    """Events identical in every field are logged twice (client retries): keep one. The
    output is sorted by (user_id, ts), the order every later stage wants."""
    table = table.sort_by([("user_id", "ascending"), ("ts", "ascending")])
    df = table.to_pandas()
    dup = df.duplicated(subset=list(EVENT_IDENTITY), keep="first").to_numpy()
    rej = _Rejects(len(df))
    rej.add(dup, Reason.DUPLICATE_EVENT, "identical to an earlier event of the same user")
    return Validated(table.filter(pa.array(~dup)), _quarantine_table("events", df, rej))

