"""User-partitioned shards: how ingest lays out ``events`` and ``users`` so that a later
stage can work on one shard at a time without a shuffle::

    <ingest>/events/part-<k>.parquet   the events of the users of shard k, sorted by (user_id, ts)
    <ingest>/users/part-<k>.parquet    the profiles of the users of shard k

A user's shard is a stable hash of its id modulo the shard count, the same for events and
profiles, so no user is split across files and shard k of both tables holds the same users
(a shard may have profiles and no events, or the reverse). The ingest manifest records the
layout under :data:`LAYOUT_KEY`; a directory without it (hand-made, or from an older ingest)
promises nothing, and readers must fall back to grouping by user themselves.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from leadre import artifacts

LAYOUT_KEY = "events_layout"
SORT_KEYS = [("user_id", "ascending"), ("ts", "ascending")]


def layout(shards: int) -> dict[str, Any]:
    """The manifest entry that vouches for the layout of the module docstring."""
    return {"partitioned_by": "user_id", "shards": shards, "sorted_by": ["user_id", "ts"],
            "files": {"events": "events/part-<k>.parquet", "users": "users/part-<k>.parquet"}}


def read_layout(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The layout an ingest manifest vouches for, or None when it promises none."""
    entry = manifest.get(LAYOUT_KEY)
    if isinstance(entry, dict) and entry.get("partitioned_by") == "user_id" and (
            entry.get("sorted_by") == ["user_id", "ts"]) and int(entry.get("shards", 0)) >= 1:
        return entry
    return None


def default_shards(n_events: int, rows_per_shard: int) -> int:
    """Shard count: about ``rows_per_shard`` events per shard, 1 to 1000 shards (a shard is
    one task of the prompt stage, so enough of them to keep every CPU busy)."""
    return int(max(1, min(1000, -(-n_events // max(rows_per_shard, 1)))))


def shard_file(k: int) -> str:
    return f"part-{k:05d}.parquet"


def shard_of(user_ids: pa.Array | pa.ChunkedArray, shards: int) -> np.ndarray:
    """Shard of every row's user (int64): blake2b of the id modulo ``shards``, hashed once per
    distinct id, so it is the same in every process and on every machine."""
    if shards == 1 or len(user_ids) == 0:
        return np.zeros(len(user_ids), np.int64)
    ids = pc.cast(user_ids, pa.string())
    uniq = pc.unique(ids)
    of_uniq = np.array([int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(),
                                       "little") % shards for u in uniq.to_pylist()], np.int64)
    return of_uniq[pc.index_in(ids, uniq).to_numpy(zero_copy_only=False)]


def write_file(table: pa.Table, location: str, name: str, k: int) -> None:
    """``table`` as ``<location>/<name>/part-<k>.parquet`` (a retried task overwrites it)."""
    fs, root = artifacts.resolve(artifacts.join(location, name))
    fs.create_dir(root, recursive=True)
    pq.write_table(table, f"{root}/{shard_file(k)}", filesystem=fs)


def clear(location: str, name: str) -> None:
    fs, root = artifacts.resolve(artifacts.join(location, name))
    if fs.get_file_info(root).type != artifacts.pafs.FileType.NotFound:
        fs.delete_dir(root)


def write_users(users: pa.Table, location: str, shards: int) -> None:
    """Profiles split by shard (every shard that has users gets a file; none when empty)."""
    clear(location, "users")
    if users.num_rows == 0:
        write_file(users, location, "users", 0)
        return
    of = shard_of(users.column("user_id"), shards)
    for k in np.unique(of).tolist():
        write_file(users.filter(pa.array(of == k)), location, "users", k)


def write_partitioned(events: pa.Table, users: pa.Table, location: str, shards: int) -> None:
    """Both tables in the layout of the module docstring, from tables in memory (small inputs
    and benchmarks; the ingest stage writes the same layout from Ray tasks)."""
    clear(location, "events")
    of = shard_of(events.column("user_id"), shards)
    for k in np.unique(of).tolist():
        write_file(events.filter(pa.array(of == k)).sort_by(SORT_KEYS), location, "events", k)
    write_users(users, location, shards)


def shard_ids(location: str) -> list[int]:
    """The shards that have an events or a users file."""
    found: set[int] = set()
    for name in ("events", "users"):
        fs, root = artifacts.resolve(artifacts.join(location, name))
        if fs.get_file_info(root).type == artifacts.pafs.FileType.NotFound:
            continue
        for info in fs.get_file_info(artifacts.pafs.FileSelector(root)):
            stem = info.base_name
            if stem.startswith("part-") and stem.endswith(".parquet"):
                found.add(int(stem[len("part-"):-len(".parquet")]))
    return sorted(found)


def read_shard(location: str, name: str, k: int) -> pa.Table | None:
    """Shard ``k`` of ``events`` or ``users`` (None when that shard has no such file)."""
    fs, root = artifacts.resolve(artifacts.join(location, name))
    path = f"{root}/{shard_file(k)}"
    if fs.get_file_info(path).type == artifacts.pafs.FileType.NotFound:
        return None
    return pq.read_table(path, filesystem=fs)
