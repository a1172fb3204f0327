"""Stage 3 on Ray Data. :func:`run` picks the engine: ``shards`` (:mod:`leadre.prompts.batch`,
one task per user shard of the ingest output, no shuffle) when the ingest manifest vouches for
user-partitioned events, else ``groupby``, described here: events + profiles -> group by user
-> :func:`build_user` -> sharded parquet, in one streaming pass.

    read events ──map_batches(ts -> int ms)──┐
                                             ├─ union ─ groupby(user_id).map_groups(build) ─ write
    read users ──map_batches(profile row)───┘                                       (PromptSink)

* Profiles ride along the shuffle as one extra row per user (``domain = "__profile__"``,
  the profile as JSON in ``title``), so no table is broadcast and users scale with the cluster.
* The ad catalog (ad_id -> S-ID, title, category, eCPM, active) is small and read-only: it is
  put in the object store once and cached per worker process.
* Every group yields one table of :data:`ROWS`; :class:`PromptSink` routes its rows by kind and
  split into ``<out>/<kind>/<split>/part-<task>.parquet`` with the public column sets, and
  returns row counts, so nothing is materialised and the manifest's counts come for free.
* Ad-level auxiliary examples (one per catalog ad) are built in the driver.

:func:`build_local` runs the same per-group function in a single process without Ray (the
reference for tests and the benchmark's pure-Python baseline).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import Datasink

from leadre import artifacts
from leadre.artifacts import ArtifactError
from leadre.data.schema import MS_PER_DAY
from leadre.data.shards import LAYOUT_KEY, read_layout
from leadre.prompts.catalog import Catalog
from leadre.prompts.config import PromptConfig
from leadre.prompts.contract import (EXPECTED, LAYOUT, OUTPUTS, PAIR_TYPES, SPLITS, STAGE, TASKS,
                                     split_path)
from leadre.prompts.examples import Rows, SplitPlan, build_ad_rows, build_user
from leadre.prompts.render import Event, content_text
from leadre.prompts.tables import (PROFILE_DOMAIN, events_batch, profile_batch, profile_from_json,
                                   route)
from leadre.prompts.templates import PROMPT_TEMPLATES, templates_version
from leadre.sids.content import ContentCodes
from leadre.sids.table import SidTable

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- inputs


def load_catalog(cfg: PromptConfig) -> tuple[Catalog, dict[str, Any], dict[str, Any]]:
    """(catalog, ingest manifest, sids manifest); ArtifactError on missing/wrong inputs."""
    from leadre.sids.build import load_cold_ads  # (here: the S-ID stage's module loads torch)

    ingest = artifacts.read_manifest(cfg.ingest_dir, stage="ingest")
    sids = artifacts.read_manifest(cfg.sids_dir, stage="sids")
    table = SidTable.load(cfg.sids_dir)
    ads = artifacts.read_table(cfg.ingest_dir, "ads")
    # the cold-start split the S-IDs were built with (empty when off)
    catalog = Catalog.from_tables(ads, table, load_cold_ads(cfg.sids_dir))
    if catalog.cold:
        log.info("prompts: cold-start split: %d cold ads are test targets only",
                 len(catalog.cold))
    if cfg.content_object != "title":
        codes = ContentCodes.from_sids_dir(cfg.sids_dir, cfg.content_code_levels, table.prefixes)
        if codes is None:
            log.warning("prompts: %s has no content title codes (bring-your-own S-IDs, or "
                        "built with titles=false): content events show their titles",
                        cfg.sids_dir)
        else:
            catalog.content = {t: content_text(t, codes.code(t), cfg.content_object)
                               for t in codes.codes}
    return catalog, ingest, sids


def _events_path(cfg: PromptConfig) -> tuple[pafs.FileSystem, str]:
    fs, path = artifacts.resolve(artifacts.join(cfg.ingest_dir, "events"))
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise ArtifactError(f"{cfg.ingest_dir}/events does not exist: is it a `leadre ingest` "
                            "output directory?")
    return fs, path


def make_plan(cfg: PromptConfig, source: str | None) -> tuple[SplitPlan, dict[str, Any]]:
    """The split of this run and a description of it for the manifest."""
    mode = cfg.split if cfg.split != "auto" else (
        "leave_one_out" if source == "lcrec" else "time")
    if mode == "leave_one_out":
        return SplitPlan(mode), {"mode": mode, "history": f"last {cfg.max_events} events"}

    def ms(value: str) -> int:
        t = pd.Timestamp(value)
        t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
        return int(t.value // 1_000_000)

    lo = hi = None
    if cfg.valid_start is None or cfg.test_start is None:
        fs, path = _events_path(cfg)
        ts = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["ts"])
        if ts.num_rows == 0:
            raise ArtifactError(f"{cfg.ingest_dir}/events is empty: nothing to build prompts from")
        mm = pc.min_max(pc.cast(ts.column("ts"), pa.int64())).as_py()
        lo, hi = mm["min"], mm["max"]
        end = round(hi / MS_PER_DAY) * MS_PER_DAY  # the log's end, to the nearest midnight
    test_start = ms(cfg.test_start) if cfg.test_start else end - cfg.test_days * MS_PER_DAY
    valid_start = ms(cfg.valid_start) if cfg.valid_start else test_start - cfg.valid_days * MS_PER_DAY
    if valid_start > test_start:
        raise ArtifactError(f"valid_start {cfg.valid_start or valid_start} is after test_start "
                            f"{cfg.test_start or test_start}")
    if lo is not None and valid_start <= lo:
        raise ArtifactError(
            f"the valid window starts at or before the first event (log spans "
            f"{pd.Timestamp(lo, unit='ms')} .. {pd.Timestamp(hi, unit='ms')}); reduce "
            "valid_days/test_days or set valid_start/test_start")
    iso = lambda v: pd.Timestamp(v, unit="ms", tz="UTC").isoformat()  # noqa: E731
    return SplitPlan(mode, valid_start, test_start), {
        "mode": mode, "valid_start": iso(valid_start), "test_start": iso(test_start),
        **({"log_start": iso(lo), "log_end": iso(hi)} if lo is not None else {})}


# --------------------------------------------------------------------------- per-user groups


def build_group_rows(group: pa.Table, catalog: Catalog, cfg: PromptConfig, plan: SplitPlan,
                     rows: Rows) -> None:
    """One user's group (GROUP_SCHEMA rows) -> rows appended to ``rows``. A bug or bad data
    in one user becomes a ``skipped`` row with reason ``error``, never a failed job."""
    user_id = group.column("user_id")[0].as_py()
    profile, events = None, []
    try:
        cols = [group.column(c).to_pylist() for c in ("ts", "domain", "action", "ad_id", "title")]
        for ts, domain, action, ad_id, title in zip(*cols):
            if domain == PROFILE_DOMAIN:
                profile = profile_from_json(title)
            else:
                events.append(Event(ts, domain, action, ad_id, title))
        mine = build_user(user_id, profile, events, catalog, cfg, plan)
    except Exception as e:  # noqa: BLE001 - reported per user, see the docstring
        log.warning("prompts: user %s failed: %r", user_id, e)
        mine = Rows()
        mine.add("skipped", None, "error", user_id, detail=f"{type(e).__name__}: {e}"[:500])
    for name, col in rows.cols.items():
        col.extend(mine.cols[name])


_CATALOG_CACHE: dict[str, Catalog] = {}


def _catalog(ref_box: list) -> Catalog:
    import ray

    key = ref_box[0].hex()
    if key not in _CATALOG_CACHE:
        _CATALOG_CACHE.clear()
        _CATALOG_CACHE[key] = ray.get(ref_box[0])
    return _CATALOG_CACHE[key]


def build_group(group: pa.Table, catalog_ref: list, cfg: PromptConfig, plan: SplitPlan) -> pa.Table:
    """The ``map_groups`` UDF: one user's rows as a ROWS table."""
    rows = Rows()
    build_group_rows(group, _catalog(catalog_ref), cfg, plan, rows)
    return rows.to_arrow()


# --------------------------------------------------------------------------- sink


class PromptSink(Datasink):
    """Writes each task's rows to ``<out>/<kind>/<split>/part-<task>.parquet`` (one file per
    output per write task; a retried task overwrites its own files) and returns counts."""

    def __init__(self, out: str):
        self.out = out
        self.counts: Counter = Counter()

    def get_name(self) -> str:
        return "PromptShards"

    def write(self, blocks: Iterable[Any], ctx) -> dict[str, int]:
        from ray.data.block import BlockAccessor

        fs, root = artifacts.resolve(self.out)
        writers: dict[tuple[str, str | None], pq.ParquetWriter] = {}
        counts: Counter = Counter()
        try:
            for block in blocks:
                tables, c = route(BlockAccessor.for_block(block).to_arrow())
                counts.update(c)
                for key, table in tables.items():
                    if key not in writers:
                        d = split_path(root, *key)
                        fs.create_dir(d, recursive=True)
                        writers[key] = pq.ParquetWriter(f"{d}/part-{ctx.task_idx:05d}.parquet",
                                                        table.schema, filesystem=fs)
                    writers[key].write_table(table)
        finally:
            for w in writers.values():
                w.close()
        return dict(counts)

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            if r:
                self.counts.update(r)


def _clear_outputs(out: str) -> None:
    fs, root = artifacts.resolve(out)
    for kind in OUTPUTS:
        p = split_path(root, kind)
        if fs.get_file_info(p).type != pafs.FileType.NotFound:
            fs.delete_dir(p)


def _write_local(out: str, tables: dict[tuple[str, str | None], pa.Table], name: str) -> None:
    fs, root = artifacts.resolve(out)
    for key, table in tables.items():
        d = split_path(root, *key)
        fs.create_dir(d, recursive=True)
        pq.write_table(table, f"{d}/part-{name}.parquet", filesystem=fs)


def _fill_empty(out: str) -> None:
    """Every promised output directory exists, with a zero-row shard if nothing went there."""
    fs, root = artifacts.resolve(out)
    for kind, split in EXPECTED:
        d = split_path(root, kind, split)
        if fs.get_file_info(d).type == pafs.FileType.NotFound or not fs.get_file_info(
                pafs.FileSelector(d)):
            fs.create_dir(d, recursive=True)
            pq.write_table(OUTPUTS[kind][0].empty_table(), f"{d}/part-empty.parquet", filesystem=fs)


# --------------------------------------------------------------------------- manifest


def shape_counts(flat: Counter) -> dict[str, Any]:
    """``kind/split/label`` counts -> the manifest's nested counts."""
    counts: dict[str, Any] = {
        "sft": {s: {t: 0 for t in TASKS} for s in SPLITS},
        "dpo": {s: {p: 0 for p in PAIR_TYPES} for s in SPLITS},
        "eval": {s: 0 for s in SPLITS},
        "skipped_users": {}, "dropped_events": {}, "notes": {},
    }
    for key, n in sorted(flat.items()):
        kind, split, label = key.split("/", 2)
        if kind in ("sft", "dpo"):
            counts[kind].setdefault(split, {})
            counts[kind][split][label] = counts[kind][split].get(label, 0) + n
        elif kind == "eval":
            counts["eval"][split] = counts["eval"].get(split, 0) + n
        elif kind == "skipped":
            counts["skipped_users"][label] = counts["skipped_users"].get(label, 0) + n
        elif label.startswith("dropped_"):
            counts["dropped_events"][label[len("dropped_"):]] = n
        else:
            counts["notes"][label] = n
    notes = counts["notes"]
    counts["users"] = {"total": notes.pop("users", 0),
                       "with_examples": notes.pop("users_with_examples", 0),
                       "skipped": sum(counts["skipped_users"].values())}
    counts["totals"] = {
        "sft": sum(sum(v.values()) for v in counts["sft"].values()),
        "dpo": sum(sum(v.values()) for v in counts["dpo"].values()),
        "eval": sum(counts["eval"].values()),
    }
    counts["totals"]["examples"] = counts["totals"]["sft"] + counts["totals"]["dpo"]
    return counts


def _finish(cfg: PromptConfig, flat: Counter, timings: dict[str, float], catalog: Catalog,
            ingest: dict, sids: dict, split_info: dict, extra: dict | None = None) -> dict:
    counts = shape_counts(flat)
    seconds = sum(timings.values())
    sid_version = sids.get("version") or catalog.sid_version
    manifest = artifacts.write_manifest(
        cfg.out, STAGE,
        inputs={"ingest_dir": cfg.ingest_dir, "sids_dir": cfg.sids_dir,
                "source": (ingest.get("inputs") or {}).get("source"),
                "ingest_created_at": ingest.get("created_at"),
                "sids_created_at": sids.get("created_at")},
        config=cfg, counts=counts, timings=timings,
        extra={"sid_version": sid_version, "encoder_version": sids.get("encoder_version"),
               "content_titles_coded": len(catalog.content), "split": split_info,
               "templates_version": templates_version(), "template_variants": len(PROMPT_TEMPLATES),
               "layout": LAYOUT, "cold_ads": len(catalog.cold),
               **(extra or {})})
    manifest["summary"] = {
        "out": cfg.out, "split": split_info["mode"], "sid_version": sid_version,
        "users": counts["users"],
        "sft": {s: sum(v.values()) for s, v in counts["sft"].items()},
        "dpo": {s: sum(v.values()) for s, v in counts["dpo"].items()},
        "eval": counts["eval"], "skipped_users": counts["skipped_users"],
        **({"cold_split": {"cold_ads": len(catalog.cold),
                           "events_dropped": counts["dropped_events"].get("cold_ad", 0)}}
           if catalog.cold else {}),
        "seconds": round(seconds, 2),
        "examples_per_s": round(counts["totals"]["examples"] / seconds, 1) if seconds else None,
    }
    return manifest


# --------------------------------------------------------------------------- entry points


def _partitions(cfg: PromptConfig, n_rows: int) -> int:
    if cfg.partitions:
        return cfg.partitions
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1)) or 1
    return int(min(200, max(2 * cpus, math.ceil(n_rows / 250_000))))


def run(cfg: PromptConfig) -> dict[str, Any]:
    """``leadre prompts``: build every output of stage 3 on Ray Data and write the manifest."""
    from leadre.prompts.batch import run_shards
    from leadre.runtime import init_ray

    timings: dict[str, float] = {}
    with artifacts.timed(timings, "load"):
        catalog, ingest, sids = load_catalog(cfg)
        plan, split_info = make_plan(cfg, (ingest.get("inputs") or {}).get("source"))
        fs, events_path = _events_path(cfg)
        n_events = pads.dataset(events_path, filesystem=fs, format="parquet").count_rows()
    log.info("prompts: %d events, %d ads (S-ID version %s), split %s", n_events,
             len(catalog.ad_ids), catalog.sid_version, split_info)

    layout = read_layout(ingest)
    if cfg.engine == "shards" and layout is None:
        raise ArtifactError(f"engine=shards needs user-partitioned events, and the manifest of "
                            f"{cfg.ingest_dir} records no {LAYOUT_KEY} (hand-made, or written "
                            "by an older ingest): rerun `leadre ingest`, or use engine=groupby")
    engine = "groupby" if cfg.engine == "groupby" or layout is None else "shards"
    if cfg.engine == "auto" and layout is None:
        log.info("prompts: %s records no %s: grouping events by user with a shuffle",
                 cfg.ingest_dir, LAYOUT_KEY)
    init_ray(cfg.ray)
    if engine == "shards":
        with artifacts.timed(timings, "build_and_write"):
            _clear_outputs(cfg.out)
            flat, info = run_shards(cfg, catalog, plan)
    else:
        flat, partitions = _run_groupby(cfg, catalog, plan, events_path, fs, n_events, timings)
        info = {"partitions": partitions}
    with artifacts.timed(timings, "ad_tasks"):
        tables, c = route(build_ad_rows(catalog, cfg).to_arrow())
        _write_local(cfg.out, tables, "ads")
        flat.update(c)
        _fill_empty(cfg.out)
    return _finish(cfg, flat, timings, catalog, ingest, sids, split_info,
                   {**info, "engine": engine})


def _run_groupby(cfg: PromptConfig, catalog: Catalog, plan: SplitPlan, events_path: str,
                 fs: pafs.FileSystem, n_events: int, timings: dict[str, float]
                 ) -> tuple[Counter, int]:
    """The engine ``groupby``: union events and profile rows, hash-shuffle by user, one
    :func:`build_group` call per user, :class:`PromptSink` routes and writes."""
    import ray

    with artifacts.timed(timings, "build_and_write"):
        _clear_outputs(cfg.out)
        events = ray.data.read_parquet(events_path, filesystem=fs).map_batches(
            events_batch, batch_format="pyarrow")
        ufs, upath = artifacts.resolve(artifacts.join(cfg.ingest_dir, "users"))
        if ufs.get_file_info(upath).type != pafs.FileType.NotFound:
            users = ray.data.read_parquet(upath, filesystem=ufs).map_batches(
                profile_batch, batch_format="pyarrow")
            events = events.union(users)
        partitions = _partitions(cfg, n_events)
        sink = PromptSink(cfg.out)
        (events.groupby("user_id", num_partitions=partitions)
         .map_groups(build_group, batch_format="pyarrow", zero_copy_batch=True,
                     fn_kwargs={"catalog_ref": [ray.put(catalog)], "cfg": cfg, "plan": plan})
         .write_datasink(sink))
    return sink.counts, partitions


def build_local(cfg: PromptConfig, write: bool = True) -> dict[str, Any]:
    """The same builder in one process, no Ray: read, sort by user, call
    :func:`build_group_rows` per user, route and (optionally) write. Slower on many cores;
    the reference for tests and the benchmark's pure-Python baseline."""
    timings: dict[str, float] = {}
    with artifacts.timed(timings, "load"):
        catalog, ingest, sids = load_catalog(cfg)
        plan, split_info = make_plan(cfg, (ingest.get("inputs") or {}).get("source"))
        fs, events_path = _events_path(cfg)
        parts = [events_batch(pads.dataset(events_path, filesystem=fs, format="parquet").to_table())]
        if artifacts.exists(artifacts.join(cfg.ingest_dir, "users")):
            parts.append(profile_batch(artifacts.read_table(cfg.ingest_dir, "users")))
        table = pa.concat_tables(parts).sort_by([("user_id", "ascending")])
    with artifacts.timed(timings, "build_and_write"):
        rows = Rows()
        users = table.column("user_id").to_numpy(zero_copy_only=False)
        bounds = np.flatnonzero(users[1:] != users[:-1]) + 1 if len(users) else np.zeros(0, int)
        starts = [0, *bounds.tolist()]
        ends = [*bounds.tolist(), len(users)]
        for s, e in zip(starts, ends):
            if e > s:
                build_group_rows(table.slice(s, e - s), catalog, cfg, plan, rows)
        build_ad_rows(catalog, cfg, rows)
        tables, flat = route(rows.to_arrow())
        if write:
            _clear_outputs(cfg.out)
            _write_local(cfg.out, tables, "00000")
            _fill_empty(cfg.out)
    if not write:
        return {"tables": tables, "counts": shape_counts(flat), "timings": timings}
    return _finish(cfg, flat, timings, catalog, ingest, sids, split_info, {"engine": "local"})

