"""Stage 1, ingest: read raw logs with Ray Data, validate them in batches, write the clean
``ads`` / ``users`` / ``events`` tables, the ``quarantine`` table and a manifest.

Nothing is dropped silently: every input row ends up either in a clean table or in
quarantine with a reason (see :class:`leadre.data.schema.Reason`), and the manifest's counts add up:
per table, ``rows_in`` (counted on the raw input, before any validation) equals ``clean`` (counted
on the tables written) plus the sum of ``by_reason`` (counted on the quarantine written), or the
job fails. Input with nothing usable in it (no ads or no events at all, a table whose every row
is quarantined, events none of which names an ad of the ads table or a user of a non-empty users
table) is an :class:`UnusableInputError` naming the table, with the quarantine written and no
manifest. Checks that need the whole table run after
the batch checks: duplicate ad/user ids on the (small) dimension tables in the driver,
duplicate events per user shard with a Ray Data group-by, so events scale with the cluster.

``events`` and ``users`` are written user-partitioned (:mod:`leadre.data.shards`): shard k of
both holds the same users, no user is split across files, and events are sorted by
(user_id, ts); the manifest records the layout, so the prompt stage needs no shuffle.

With the cold-start split on (``IngestConfig.cold_fraction`` > 0), the written ``ads`` table
carries one column beyond the clean schema, ``cold`` (bool, :func:`mark_cold`); off, the
table is exactly the clean schema (readers treat a missing column as "no ad is cold"). The
manifest's ``cold_split`` records the fraction, seed and count either way.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray

from leadre import artifacts
from leadre.data import lcrec, schema, shards
from leadre.data.config import IngestConfig
from leadre.runtime import init_ray

log = logging.getLogger(__name__)

# Columns appended to a table's own columns while a batch carries clean and rejected rows.
_Q = ("_reason", "_detail", "_row")


# --------------------------------------------------------------------------- batch functions
# A batch goes in raw and comes out as one table holding both outcomes: the table's columns
# (nullable) for clean rows, plus _reason/_detail/_row for rejected ones. Ray Data needs one
# output per batch; the split into two datasets happens afterwards.

def _combined_schema(name: str) -> pa.Schema:
    return pa.schema(list(schema.RAW_SCHEMAS[name]) + [pa.field(c, pa.string()) for c in _Q])


def _combine(name: str, v: schema.Validated) -> pa.Table:
    target = _combined_schema(name)
    clean = v.clean.cast(pa.schema(list(target)[: len(schema.SCHEMAS[name])]))
    for c in _Q:
        clean = clean.append_column(c, pa.nulls(clean.num_rows, pa.string()))
    q = v.quarantine
    rejected = pa.table(
        [pa.nulls(q.num_rows, f.type) for f in schema.SCHEMAS[name]]
        + [q.column("reason"), q.column("detail"), q.column("row")], schema=target)
    return pa.concat_tables([clean, rejected])


def _validate_batch(batch: pa.Table, name: str, limits: schema.TextLimits,
                    known_ads_ref: list | None = None, time_range: schema.TimeRange | None = None,
                    max_age: int = 120) -> pa.Table:
    if name == "ads":
        v = schema.validate_ads(batch, limits)
    elif name == "users":
        v = schema.validate_users(batch, max_age=max_age, limits=limits)
    else:
        known = ray.get(known_ads_ref[0]) if known_ads_ref else None
        v = schema.validate_events(batch, known, time_range or schema.TimeRange(), limits)
    return _combine(name, v)


_SHARD = "_shard"


def _with_shard(batch: pa.Table, n_shards: int) -> pa.Table:
    return batch.append_column(_SHARD, pa.array(shards.shard_of(batch.column("user_id"),
                                                                n_shards)))


def _dedupe_and_write_shard(group: pa.Table, out: str) -> pa.Table:
    """One user shard: drop duplicate events, write the rest sorted by (user_id, ts) as the
    shard's file (a retried task overwrites it), return the duplicates as quarantine rows."""
    k = int(group.column(_SHARD)[0].as_py())
    clean = group.select([f.name for f in schema.EVENTS]).cast(schema.EVENTS)
    v = schema.flag_duplicate_events(clean)
    shards.write_file(v.clean, out, "events", k)
    return v.quarantine


def _clean_rows(batch: pa.Table, name: str) -> pa.Table:
    kept = batch.filter(pc.is_null(batch.column("_reason")))
    return kept.select([f.name for f in schema.SCHEMAS[name]]).cast(schema.SCHEMAS[name])


def _quarantine_rows(batch: pa.Table, name: str) -> pa.Table:
    q = batch.filter(pc.is_valid(batch.column("_reason")))
    return pa.table({"table": pa.array([name] * q.num_rows, pa.string()),
                     "reason": q.column("_reason"), "detail": q.column("_detail"),
                     "row": q.column("_row")}, schema=schema.QUARANTINE)


# --------------------------------------------------------------------------- cold-start split

COLD = "cold"  # the ads table's column: held out of training (the cold-start split)


def _cold_hash(seed: int, ad_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\x1f{ad_id}".encode(), digest_size=8).digest(),
                          "little")


def mark_cold(ads: pa.Table, fraction: float, seed: int) -> pa.Table:
    """``ads`` with a bool column ``cold``: the ``round(fraction * active)`` active ads with the
    smallest hash of (``seed``, ad_id), at least one when ``fraction > 0`` and two or more ads
    are active (an inactive ad can never be a target, so it is never cold). Which ads are
    cold depends on the seed and the ids only, not on row order or workers."""
    active = [bool(a) for a in ads.column("active").to_pylist()]
    ids = ads.column("ad_id").to_pylist()
    n_active = sum(active)
    n_cold = round(fraction * n_active)
    if fraction > 0 and n_cold == 0 and n_active >= 2:
        n_cold = 1
    ranked = sorted((i for i, a in enumerate(active) if a), key=lambda i: _cold_hash(seed, ids[i]))
    cold = [False] * len(ids)
    for i in ranked[:n_cold]:
        cold[i] = True
    if COLD in ads.column_names:  # a re-ingested ingest output: the new split replaces it
        ads = ads.drop_columns([COLD])
    return ads.append_column(pa.field(COLD, pa.bool_(), nullable=False),
                             pa.array(cold, pa.bool_()))


# --------------------------------------------------------------------------- stage


def _read_raw(cfg: IngestConfig) -> tuple[dict[str, ray.data.Dataset], dict[str, int],
                                          dict[str, Any]]:
    """The raw tables as datasets, their row counts (read from the input itself: parquet
    footers, or the LC-Rec tables in memory) and notes for the manifest."""
    if cfg.source == "lcrec":
        tables, notes = lcrec.load(cfg.input_dir, cfg.dataset_name, cfg.category_level, cfg.ecpm)
        return ({k: ray.data.from_arrow(t) for k, t in tables.items()},
                {k: t.num_rows for k, t in tables.items()}, notes)
    datasets, rows_in = {}, {}
    for name in ("ads", "users", "events"):
        path = artifacts.join(cfg.input_dir, name)
        if not artifacts.exists(path):
            if name == "users":  # profiles are optional: every facet is nullable
                datasets[name] = ray.data.from_arrow(schema.RAW_SCHEMAS["users"].empty_table())
                rows_in[name] = 0
                continue
            raise artifacts.ArtifactError(f"{path} does not exist: --input-dir must hold ads/ and "
                                          f"events/ parquet directories (users/ optional)")
        fs, p = artifacts.resolve(path)
        files, rows_in[name] = _check_files(name, fs, p, path)
        datasets[name] = ray.data.read_parquet(files, filesystem=fs)
    return datasets, rows_in, {}


def _check_files(name: str, fs: Any, path: str, location: str) -> tuple[list[str], int]:
    """Every parquet file of one table, each checked before any work starts: readable (a
    truncated file is named, not a traceback from deep inside Ray Data) and holding the
    table's required columns; and the table's row count, from the files' footers."""
    infos = fs.get_file_info(artifacts.pafs.FileSelector(path, recursive=True))
    files = sorted(i.path for i in infos if i.type == artifacts.pafs.FileType.File
                   and not i.base_name.startswith((".", "_")))
    if not files:
        raise schema.SchemaError(f"{name} table: {location} holds no parquet files")
    rows = 0
    for f in files:
        try:
            meta = pq.read_metadata(f, filesystem=fs)
            file_schema = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as e:
            raise schema.SchemaError(f"{name} table: {f} is not a readable parquet file "
                                     f"({str(e).splitlines()[0]})") from None
        schema.check_columns(name, file_schema, f)
        rows += meta.num_rows
    return files, rows


def _reason_counts(q: pa.Table) -> dict[str, int]:
    if q.num_rows == 0:
        return {}
    return {d["values"]: d["counts"] for d in q.column("reason").value_counts().to_pylist()}


def _validate_dimension(ds: ray.data.Dataset, name: str, key: str, cfg: IngestConfig):
    """Ads and users: batch checks on Ray Data, then duplicate ids in the driver (these tables
    are small next to events, and the clean ad ids are needed in full for the event checks)."""
    combined = ds.map_batches(_validate_batch, batch_format="pyarrow", batch_size=cfg.batch_size,
                              fn_kwargs={"name": name, "max_age": cfg.max_age,
                                         "limits": cfg.text_limits})
    # One execution of the pipeline; an empty input yields no blocks at all.
    blocks = ray.get(combined.to_arrow_refs())
    both = pa.concat_tables(blocks) if blocks else _combined_schema(name).empty_table()
    clean = _clean_rows(both, name)
    dedup = schema.flag_duplicate_keys(clean, name, key)
    quarantine = pa.concat_tables([_quarantine_rows(both, name), dedup.quarantine])
    return dedup.clean, quarantine


class QuarantineError(artifacts.ArtifactError):
    """Too large a share of a table failed validation: the upstream is broken."""


class UnusableInputError(artifacts.ArtifactError):
    """The input has the right schema but nothing a later stage could use: no ads or no events
    at all, a table whose every row is quarantined, or events that name no ad of the ads table
    (or no user of a non-empty users table)."""


def _source(cfg: IngestConfig, name: str) -> str:
    """Where table ``name`` came from, for messages."""
    if cfg.source == "lcrec":
        return f"the {name} of the LC-Rec files in {cfg.input_dir}"
    return artifacts.join(cfg.input_dir, name)


def _by_reason(counts: dict[str, int]) -> str:
    return ", ".join(f"{r}={n:,}" for r, n in sorted(counts.items()))


def _refuse(cfg: IngestConfig, problems: list[str], quarantine: list[pa.Table],
            written: bool = False) -> None:
    """Raise :class:`UnusableInputError` for ``problems`` (if any). The quarantine gathered so
    far is written first (unless it already is), so the rejected rows can be inspected."""
    if not problems:
        return
    q = pa.concat_tables(quarantine) if quarantine else schema.QUARANTINE.empty_table()
    if q.num_rows and not written:
        artifacts.write_table(q, cfg.out, "quarantine")
    where = (f" The rejected rows are in {artifacts.join(cfg.out, 'quarantine')}."
             if q.num_rows else "")
    raise UnusableInputError("; ".join(problems) + ". Nothing usable to ingest: no manifest "
                             "was written." + where)


def _empty_tables(cfg: IngestConfig, rows_in: dict[str, int]) -> list[str]:
    """Ads and events are required to hold rows (users, the optional profiles, may not)."""
    return [f"{name} table: {_source(cfg, name)} holds no rows"
            for name in ("ads", "events") if rows_in[name] == 0]


def _all_quarantined(cfg: IngestConfig, name: str, rows_in: int, clean: int,
                     quarantine: pa.Table) -> list[str]:
    if rows_in == 0 or clean > 0:
        return []
    q = quarantine.filter(pc.equal(quarantine.column("table"), name))
    reasons = _by_reason(_reason_counts(q))
    return [f"{name} table: all {rows_in:,} rows of {_source(cfg, name)} are quarantined "
            f"({reasons})"]


def _unreferenced(cfg: IngestConfig, users: pa.Table, counts: dict[str, Any]) -> list[str]:
    """Clean events exist but none names an ad (every ad event's ad_id was unknown or bad), or
    the users table holds users and no clean event is theirs (tables of different sources).
    Each is one early-exit scan of the written events."""
    fs, p = artifacts.resolve(artifacts.join(cfg.out, "events"))
    events = pads.dataset(p, filesystem=fs, format="parquet")
    n, source = counts["events"]["clean"], _source(cfg, "events")
    problems = []
    if events.head(1, columns=["domain"], filter=pc.field("domain") == "ad").num_rows == 0:
        reasons = _by_reason(counts["events"]["by_reason"]) or "none"
        problems.append(f"events table: none of the {n:,} clean events of {source} is an ad "
                        f"event naming an ad of the ads table (events quarantined: {reasons})")
    if users.num_rows and events.head(1, columns=["user_id"], filter=pc.field("user_id").isin(
            users.column("user_id"))).num_rows == 0:
        problems.append(f"events table: none of the {n:,} clean events of {source} is by one "
                        f"of the {users.num_rows:,} users of {_source(cfg, 'users')}: the "
                        f"tables are not from the same source")
    return problems


def _check_accounting(rows_in: dict[str, int], clean: dict[str, int],
                      quarantine: pa.Table) -> dict[str, Any]:
    """The manifest's counts of every table, each counted on its own: ``rows_in`` on the raw
    input, ``clean`` on the tables written, ``by_reason`` on the quarantine written. Raises
    when they do not add up (a row lost or counted twice is a bug, never bad input)."""
    counts: dict[str, Any] = {}
    for name in ("ads", "users", "events"):
        q = quarantine.filter(pc.equal(quarantine.column("table"), name))
        by_reason = _reason_counts(q)
        counts[name] = {"rows_in": rows_in[name], "clean": clean[name],
                        "quarantined": q.num_rows, "by_reason": by_reason}
        if rows_in[name] != clean[name] + sum(by_reason.values()):  # nothing vanishes
            raise RuntimeError(f"ingest lost or duplicated rows of {name}: {rows_in[name]:,} "
                               f"in, {clean[name]:,} clean + {q.num_rows:,} quarantined "
                               f"({_by_reason(by_reason)})")
    return counts


def _check_quarantine_share(cfg: IngestConfig, counts: dict[str, Any]) -> None:
    over = [(name, c) for name, c in counts.items()
            if c["rows_in"] and c["quarantined"] / c["rows_in"] > cfg.max_quarantine_share]
    if over:
        lines = [f"{name}: {c['quarantined']:,} of {c['rows_in']:,} rows "
                 f"({c['quarantined'] / c['rows_in']:.1%}) quarantined ("
                 + ", ".join(f"{r}={n:,}" for r, n in sorted(c["by_reason"].items())) + ")"
                 for name, c in over]
        raise QuarantineError(
            "; ".join(lines) + f". That is over max_quarantine_share={cfg.max_quarantine_share}"
            f": a broken upstream, not dirty data. No manifest was written; the rejected rows "
            f"are in {artifacts.join(cfg.out, 'quarantine')} for inspection.")


def run(cfg: IngestConfig) -> dict[str, Any]:
    # A manifest marks a complete output: remove an old one first, so a run that fails half
    # way never leaves new partial tables under a manifest that vouches for them.
    stale = artifacts.join(cfg.out, artifacts.MANIFEST)
    if artifacts.exists(stale):
        fs, p = artifacts.resolve(stale)
        fs.delete_file(p)
    init_ray(cfg.ray)
    timings: dict[str, float] = {}
    with artifacts.timed(timings, "read"):
        raw, rows_in, notes = _read_raw(cfg)
    _refuse(cfg, _empty_tables(cfg, rows_in), [])

    with artifacts.timed(timings, "ads"):
        ads, q_ads = _validate_dimension(raw["ads"], "ads", "ad_id", cfg)
    _refuse(cfg, _all_quarantined(cfg, "ads", rows_in["ads"], ads.num_rows, q_ads), [q_ads])
    with artifacts.timed(timings, "users"):
        users, q_users = _validate_dimension(raw["users"], "users", "user_id", cfg)
    _refuse(cfg, _all_quarantined(cfg, "users", rows_in["users"], users.num_rows, q_users),
            [q_ads, q_users])

    with artifacts.timed(timings, "events"):
        known = ray.put(frozenset(ads.column("ad_id").to_pylist()))
        checked = raw["events"].map_batches(
            _validate_batch, batch_format="pyarrow", batch_size=cfg.batch_size,
            fn_kwargs={"name": "events", "known_ads_ref": [known], "time_range": cfg.time_range,
                       "limits": cfg.text_limits},
        ).materialize()
        n_events = checked.count()
        # The rejected rows go to the driver anyway (the quarantine table); fetched first, they
        # say whether any event is clean before the shuffle (which cannot group zero rows).
        q_events = ray.get(checked.map_batches(_quarantine_rows, batch_format="pyarrow",
                                               fn_kwargs={"name": "events"}).to_arrow_refs())
        n_valid = n_events - sum(q.num_rows for q in q_events)
        _refuse(cfg, _all_quarantined(cfg, "events", rows_in["events"], n_valid,
                                      pa.concat_tables([schema.QUARANTINE.empty_table(),
                                                        *q_events])),
                [q_ads, q_users, *q_events])
        clean = checked.map_batches(_clean_rows, batch_format="pyarrow",
                                    fn_kwargs={"name": "events"})
        # About batch_size events per user shard; each shard is deduplicated and written by
        # one task (a few large shuffle partitions beat Ray's default 200 tiny ones).
        n_shards = shards.default_shards(n_events, cfg.batch_size)
        for path in ("events", "quarantine"):
            shards.clear(cfg.out, path)
        duplicates = (clean.map_batches(_with_shard, batch_format="pyarrow",
                                        fn_kwargs={"n_shards": n_shards})
                      .groupby(_SHARD, num_partitions=min(n_shards, 200))
                      .map_groups(_dedupe_and_write_shard, batch_format="pyarrow",
                                  fn_kwargs={"out": cfg.out})
                      .materialize())

    with artifacts.timed(timings, "write"):
        if cfg.cold_fraction > 0:  # (off: the table keeps exactly the clean ADS schema)
            ads = mark_cold(ads, cfg.cold_fraction, cfg.cold_seed)
        artifacts.write_table(ads, cfg.out, "ads")
        shards.write_users(users, cfg.out, n_shards)
        q_all = pa.concat_tables([q_ads, q_users, *q_events,
                                  *ray.get(duplicates.to_arrow_refs())])
        artifacts.write_table(q_all, cfg.out, "quarantine")

    fs, p = artifacts.resolve(artifacts.join(cfg.out, "events"))
    n_events_clean = pads.dataset(p, filesystem=fs, format="parquet").count_rows()
    counts = _check_accounting(rows_in, {"ads": ads.num_rows, "users": users.num_rows,
                                         "events": n_events_clean}, q_all)
    _refuse(cfg, _unreferenced(cfg, users, counts), [q_all], written=True)
    _check_quarantine_share(cfg, counts)
    n_cold = int(pc.sum(ads.column(COLD)).as_py() or 0) if COLD in ads.column_names else 0
    cold_split = {"fraction": cfg.cold_fraction, "seed": cfg.cold_seed, "ads": n_cold,
                  "active_ads": int(pc.sum(ads.column("active")).as_py() or 0)}
    manifest = artifacts.write_manifest(cfg.out, "ingest", inputs={"input_dir": cfg.input_dir,
                                        "source": cfg.source, **notes}, config=cfg,
                                        counts=counts, timings=timings,
                                        extra={shards.LAYOUT_KEY: shards.layout(n_shards),
                                               "cold_split": cold_split})
    manifest["summary"] = {
        "out": cfg.out,
        **{name: f"{c['clean']} clean / {c['quarantined']} quarantined" for name, c in counts.items()},
        **({"cold_ads": f"{n_cold} of {cold_split['active_ads']} active ads held out of "
                        f"training (cold_fraction={cfg.cold_fraction})"} if n_cold else {}),
        "quarantine_reasons": _reason_counts(q_all),
        "seconds": round(sum(timings.values()), 2),
    }
    return manifest
