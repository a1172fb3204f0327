"""The Arrow tables both prompt engines pass around (``pipeline``'s group-by and ``batch``'s
shards): ingest events and users as one per-user row schema, and the routing of built rows
into the public output tables of :mod:`leadre.prompts.contract`."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from leadre.data.schema import PROFILE_FIELDS
from leadre.prompts.contract import OUTPUTS

PROFILE_DOMAIN = "__profile__"
GROUP_SCHEMA = pa.schema([("user_id", pa.string()), ("ts", pa.int64()), ("domain", pa.string()),
                          ("action", pa.string()), ("ad_id", pa.string()), ("title", pa.string())])


def events_batch(batch: pa.Table) -> pa.Table:
    """Ingest events -> GROUP_SCHEMA (ts as epoch ms: cheap to turn into Python ints)."""
    ts = batch.column("ts")
    if not pa.types.is_integer(ts.type):
        ts = pc.cast(ts, pa.timestamp("ms", tz="UTC")) if pa.types.is_timestamp(ts.type) else ts
        ts = pc.cast(ts, pa.int64())
    cols = {f.name: (ts if f.name == "ts" else batch.column(f.name).cast(f.type))
            for f in GROUP_SCHEMA}
    return pa.table(cols, schema=GROUP_SCHEMA)


def profile_batch(batch: pa.Table) -> pa.Table:
    """Users -> one GROUP_SCHEMA row each, the known profile attributes as JSON in ``title``."""
    names = [f for f in PROFILE_FIELDS if f in batch.column_names]
    values = {f: batch.column(f).to_pylist() for f in names}
    profiles = []
    for i in range(batch.num_rows):
        prof = {f: values[f][i] for f in names if values[f][i] is not None}
        profiles.append(json.dumps(prof, ensure_ascii=False) if prof else None)
    n = batch.num_rows
    return pa.table({"user_id": batch.column("user_id").cast(pa.string()),
                     "ts": pa.nulls(n, pa.int64()), "domain": pa.array([PROFILE_DOMAIN] * n),
                     "action": pa.nulls(n, pa.string()), "ad_id": pa.nulls(n, pa.string()),
                     "title": pa.array(profiles, pa.string())}, schema=GROUP_SCHEMA)


def profile_from_json(raw: str | None) -> dict[str, Any] | None:
    """The inverse of :func:`profile_batch`: a profile row's JSON -> its known attributes."""
    if not raw:
        return None
    prof = json.loads(raw)
    return {k: v for k, v in prof.items() if k in PROFILE_FIELDS and v is not None} or None


def route(block: pa.Table) -> tuple[dict[tuple[str, str | None], pa.Table], Counter]:
    """Split a ROWS table into the public tables ((kind, split) -> table) and count rows
    (``kind/split/label`` -> n; notes summed by label as ``note//label``)."""
    out: dict[tuple[str, str | None], pa.Table] = {}
    counts: Counter = Counter()
    if block.num_rows == 0:
        return out, counts
    kind = block.column("kind")
    split = pc.fill_null(block.column("split"), "")
    key = pc.binary_join_element_wise(kind, split, "/")
    for k in pc.unique(key).to_pylist():
        part = block.filter(pc.equal(key, k))
        kd, sp = k.split("/", 1)
        labels = part.group_by("label").aggregate([("label", "count"), ("count", "sum")])
        for lab, n, total in zip(*(labels.column(c).to_pylist()
                                   for c in ("label", "label_count", "count_sum"))):
            counts[f"{kd}/{sp}/{lab}"] += int(total or 0) if kd == "note" else int(n)
        if kd == "note":
            continue
        schema, renames = OUTPUTS[kd]
        inverse = {public: renames.get(public, public) for public in schema.names}
        out[(kd, sp or None)] = pa.table([part.column(inverse[c]) for c in schema.names],
                                         schema=schema)
    return out, counts
