"""``leadre add-ads``: ads new to the catalog, servable without retraining.

One call (:func:`add_ads`; the command, and the serving graph's ``POST /admin/ads/new``):

1. validates every new ad and assigns its S-ID with the S-ID stage's frozen encoder and
   trained quantiser (:mod:`leadre.sids.extend`: the policy for full collision groups, the
   reasons an ad is refused) — nothing is written if one ad is refused;
2. appends the ads to ``<sids>/sid_table``, ``<sids>/embeddings`` and ``<sids>/added_ads``
   (existing S-IDs and the S-ID version unchanged: the model still speaks this S-ID language);
3. builds a new index version with the settings recorded by the index in use, into a new
   directory beside it (the matcher swaps whole index versions: ``POST /admin/index``).

A failure in step 3 puts the S-ID directory back as it was and removes the half-built index,
so the command can simply be run again. Extensions of one S-ID directory are serialised by a
file lock.
"""

from __future__ import annotations

import logging
import re
import time

import pyarrow as pa

from leadre.artifacts import ArtifactError, exists, read_manifest, resolve
from leadre.config import from_dict
from leadre.data.schema import TextLimits
from leadre.index.ann import STAGE as INDEX_STAGE
from leadre.index.config import AddAdsConfig, IndexConfig

log = logging.getLogger(__name__)

STAGE = "add-ads"
_VERSION_SUFFIX = re.compile(r"\.ads\d+$")


def read_new_ads(path: str):
    """The ads of a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file (columns as the
    ingest ``ads`` table)."""
    import json

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, local = resolve(path)
    if not exists(path):
        raise FileNotFoundError(f"{path} does not exist (expected a file of new ads)")
    lower = path.lower()
    try:
        if lower.endswith(".parquet"):
            return pq.read_table(local, filesystem=fs)
        if lower.endswith(".csv"):
            with fs.open_input_stream(local) as f:
                return pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(
                    column_types={"ad_id": pa.string(), "title": pa.string(),
                                  "description": pa.string(), "category": pa.string(),
                                  "advertiser": pa.string()}))
        with fs.open_input_stream(local) as f:
            text = f.read().decode("utf-8", errors="replace")
        if lower.endswith(".jsonl") or lower.endswith(".ndjson"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif lower.endswith(".json"):
            rows = json.loads(text)
        else:
            raise ArtifactError(f"{path}: new ads must be .jsonl, .json, .parquet or .csv")
    except (json.JSONDecodeError, pa.ArrowInvalid) as e:
        raise ArtifactError(f"{path} is not a readable ads file: {e}") from None
    return ads_frame(rows, path)


def ads_frame(rows, source: str = "the request"):
    """A list of ad objects (JSON) as a DataFrame, every value as given: the checks
    (:func:`leadre.sids.extend.check_new_ads`) report a wrong type by ad."""
    import pandas as pd

    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ArtifactError(f"{source}: expected a list of ad objects "
                            '[{"ad_id": ..., "title": ..., "category": ...}, ...]')
    return pd.DataFrame(rows, dtype=object)


def next_index_dir(index_dir: str) -> str:
    """``<base>.ads<N>`` beside ``index_dir``, the first N not taken (``base`` without an
    earlier ``.ads<N>``)."""
    base = _VERSION_SUFFIX.sub("", index_dir.rstrip("/"))
    n = 1
    while exists(f"{base}.ads{n}"):
        n += 1
    return f"{base}.ads{n}"


def add_ads(sids_dir: str, index_dir: str, ads, out: str | None = None,
            limits: TextLimits | None = None) -> dict:
    """Add ``ads`` (a table, DataFrame or list of ad objects) to the catalog of ``sids_dir`` and build the index version that holds
    them (into ``out``, default :func:`next_index_dir`); returns a summary with each new ad's
    S-ID, the new index directory and version. Raises
    :class:`~leadre.sids.extend.AdsRefused` (nothing added) for unusable ads."""
    from leadre.index.build import run as build_index
    from leadre.sids.extend import catalog_id, catalog_lock, prepare_extension

    t0 = time.perf_counter()
    with catalog_lock(sids_dir):
        index_manifest = read_manifest(index_dir, stage=INDEX_STAGE)
        ext = prepare_extension(sids_dir, ads, limits)
        built_for = index_manifest.get("sid_version")
        if built_for and built_for != ext.table.version:
            raise ArtifactError(f"{index_dir} was built for S-ID version {built_for}, "
                                f"{sids_dir} holds {ext.table.version}")
        out = out or next_index_dir(index_dir)
        if exists(out):
            raise ArtifactError(f"{out} exists: the new index version needs a new directory")
        recorded = {k: v for k, v in (index_manifest.get("config") or {}).items()
                    if k in IndexConfig.__dataclass_fields__}
        index_cfg = from_dict(IndexConfig, {**recorded, "sids_dir": sids_dir, "out": out})
        ext.write()
        try:
            built = build_index(index_cfg)
        except BaseException:
            log.exception("add-ads: index build failed; putting %s back", sids_dir)
            ext.rollback()
            if exists(out):
                fs, path = resolve(out)
                fs.delete_dir(path)
            raise
    added = [{"ad_id": a, "sid": s} for a, s in zip(ext.new_ids, ext.new_sids)]
    log.info("add-ads: %d ads added to %s (catalog %d), index %s", len(added), sids_dir,
             len(ext.table), out)
    return {"status": "added", "added": added, "ads": len(ext.table),
            "sid_version": ext.table.version, "catalog": catalog_id(ext.table),
            "sids_dir": sids_dir, "index_dir": out, "index_version": built["version"],
            "indexed_ads": built["counts"]["ads"],
            "seconds": round(time.perf_counter() - t0, 3)}


def run(cfg: AddAdsConfig) -> dict:
    """The ``leadre add-ads`` command: :func:`add_ads` on the file ``cfg.ads``."""
    from leadre.sids.extend import ingest_limits

    limits = None
    if any(v is not None for v in (cfg.max_title_chars, cfg.max_description_chars,
                                   cfg.max_field_chars)):
        d = ingest_limits(cfg.sids_dir)
        limits = TextLimits(cfg.max_title_chars or d.titles,
                            cfg.max_description_chars or d.descriptions,
                            cfg.max_field_chars or d.fields)
    return add_ads(cfg.sids_dir, cfg.index_dir, read_new_ads(cfg.ads), cfg.out, limits)
