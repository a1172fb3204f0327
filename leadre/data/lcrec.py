"""Adapter for the LC-Rec / LETTER JSON format of the real datasets (../shared/datasets):

    <Name>.inter.json   {"<user>": [item_id, ...]}            (time order)
    <Name>.item.json    {"<item_id>": {"title", "description", "brand", "categories": "a,b,c"}}
    <Name>.index.json   {"<item_id>": ["<a_1>", "<b_2>", ...]}  (optional, precomputed S-IDs)

Items become ads, interactions become ordered click events. The tables come out *raw*
(nullable everywhere); the ingest stage validates them like any other source, so an
interaction with an item missing from the item file is quarantined as ``unknown_ad_id``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from leadre.data import schema
from leadre.artifacts import ArtifactError


@dataclass
class LcRecFiles:
    inter: Path
    item: Path | None
    index: Path | None
    name: str


def find_files(directory: str | Path, name: str | None = None) -> LcRecFiles:
    """Locate ``<Name>.inter.json`` (required) and its optional siblings in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} is not a directory of LC-Rec JSON files")
    inters = sorted(directory.glob(f"{name or '*'}.inter.json"))
    if len(inters) != 1:
        found = [p.name for p in inters] or "none"
        raise ArtifactError(f"expected exactly one {name or '<Name>'}.inter.json in {directory}, "
                            f"found {found}; pass the dataset name to pick one")
    stem = inters[0].name[: -len(".inter.json")]
    item = directory / f"{stem}.item.json"
    index = directory / f"{stem}.index.json"
    return LcRecFiles(inters[0], item if item.exists() else None,
                      index if index.exists() else None, stem)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} must hold a JSON object at the top level")
    return data


def category_from_path(path: Any, level: int) -> str | None:
    """The ``level``-th entry of a comma-separated category path (0 = root), falling back to
    the deepest entry that exists; None when there is no path."""
    if not isinstance(path, str) or not path.strip():
        return None
    parts = [p.strip() for p in path.split(",") if p.strip()]
    if not parts:
        return None
    return parts[min(level, len(parts) - 1)]


def load(directory: str | Path, name: str | None = None, category_level: int = 1,
         ecpm: float | None = None, start: str = "2020-01-01",
         step_seconds: int = 86_400) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Raw ``ads``, ``users``, ``events`` tables plus notes for the manifest.

    Interactions carry only their order, so event times are synthetic: the user's i-th item
    is clicked at ``start + i * step_seconds``. Items without an item file (Beauty ships S-IDs
    but no text) get the placeholder title ``item <id>`` and category ``unknown``.
    """
    files = find_files(directory, name)
    inter = _load_json(files.inter)
    items = _load_json(files.item) if files.item else {}
    notes: dict[str, Any] = {"dataset": files.name, "files": [str(p) for p in
                             (files.inter, files.item, files.index) if p is not None]}

    if items:
        ids = list(items)
        meta = [items[i] if isinstance(items[i], dict) else {} for i in ids]
        ads = {
            "ad_id": ids,
            "title": [m.get("title") for m in meta],
            "description": [m.get("description") for m in meta],
            "category": [category_from_path(m.get("categories"), category_level) or "unknown"
                         for m in meta],
            "advertiser": [m.get("brand") or None for m in meta],
        }
    else:
        source = _load_json(files.index) if files.index else {}
        ids = list(source) or sorted({str(i) for seq in inter.values() if isinstance(seq, list)
                                      for i in seq})
        ads = {"ad_id": ids, "title": [f"item {i}" for i in ids], "description": [None] * len(ids),
               "category": ["unknown"] * len(ids), "advertiser": [None] * len(ids)}
        notes["placeholder_titles"] = len(ids)
    ads["ecpm"] = [ecpm] * len(ids)
    ads["active"] = [True] * len(ids)

    users, ev_user, ev_item, ev_pos = [], [], [], []
    for user, seq in inter.items():
        users.append(user)
        if not isinstance(seq, list):
            seq = [seq]  # a scalar is one interaction; validation judges its type
        ev_user.extend([user] * len(seq))
        ev_item.extend(seq)
        ev_pos.extend(range(len(seq)))
    t0 = np.datetime64(start, "s").astype(np.int64)
    ts = (t0 + np.asarray(ev_pos, dtype=np.int64) * step_seconds) * 1000
    # item ids arrive as ints; keep non-int garbage as its repr so validation can quarantine it
    ev_ad = [str(i) if isinstance(i, (int, str)) and not isinstance(i, bool) else None
             for i in ev_item]
    bad_items = sum(1 for i, a in zip(ev_item, ev_ad) if a is None and i is not None)
    notes["interactions"] = len(ev_item)
    if bad_items:
        notes["non_id_items"] = bad_items
    n = len(ev_user)
    events = pa.table({
        "user_id": ev_user,
        "ts": pa.array(ts, pa.int64()).cast(pa.timestamp("ms")).cast(schema.TS_TYPE),
        "domain": ["ad"] * n,
        "action": ["click"] * n,
        "ad_id": ev_ad,
        "title": pa.nulls(n, pa.string()),
    }, schema=schema.RAW_SCHEMAS["events"])
    users_t = pa.table({"user_id": users, **{f.name: pa.nulls(len(users), f.type)
                                             for f in schema.USERS if f.name != "user_id"}},
                       schema=schema.RAW_SCHEMAS["users"])
    ads_t = pa.Table.from_pydict(_as_strings(ads), schema=schema.RAW_SCHEMAS["ads"])
    return {"ads": ads_t, "users": users_t, "events": events}, notes


def _as_strings(ads: dict[str, list]) -> dict[str, list]:
    """Text fields of real item files are sometimes lists or numbers: keep them as text."""
    out = dict(ads)
    for col in ("title", "description", "category", "advertiser"):
        out[col] = [v if v is None or isinstance(v, str) else
                    " ".join(map(str, v)) if isinstance(v, list) else str(v) for v in ads[col]]
    return out
