"""Stage 3 per user shard, without a shuffle: the engine ``shards`` of :func:`run_shards`.

Ingest writes events user-partitioned and sorted by (user_id, ts) (:mod:`leadre.data.shards`),
so one call can take shard k of events and of users, build every row of those users and
write them as ``<out>/<kind>/<split>/part-<k>.parquet``; only counts go back to the driver::

    shard ids ──map_batches(ShardBuilder actors, one per CPU; a shard per call:
                read, build_shard, write)── counts

:func:`build_shard` does per shard, with Arrow compute and numpy, what
:func:`leadre.prompts.examples.build_user` does per user in Python: dropping unusable events
(counted by reason; the cold-start split's events on cold ads too), finding targets,
splitting them, the visible window of every split and which users are skipped. Prompts come
from :class:`leadre.prompts.incremental.ShardPrompts` (the history pieces rendered once per
event, checked against :func:`compose_prompt`, the one prompt implementation, also used
online; over-budget prompts go through its truncation, :func:`fit_prompt`); template and
mixing hashes and DPO sampling are the functions
``build_user`` calls (:func:`pick_template`, :func:`share_picked`, :func:`dpo_pairs`). Rows
are kept as catalog rows and indices and become Arrow columns by ``take`` once per shard.
A user who gets a ``skipped`` row goes through ``build_user`` itself, so rare
cases (and their detail strings) have one implementation. The output equals ``build_user``'s
row for row (tested).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from leadre.data import shards
from leadre.data.schema import ENGAGEMENTS
from leadre.prompts.catalog import Catalog
from leadre.prompts.config import PromptConfig
from leadre.prompts.contract import LABEL_COLUMNS, OUTPUTS, SPLITS, split_path
from leadre.prompts.examples import (_LEGAL, Rng, Rows, SplitPlan, build_user, dpo_pairs,
                                     pick_template, share_picked, stable_hash)
from leadre.prompts.incremental import SUPPORTED, ShardPrompts
from leadre.prompts.render import Event, compose_prompt
from leadre.prompts.tables import (GROUP_SCHEMA, events_batch, profile_batch, profile_from_json,
                                   route)

log = logging.getLogger(__name__)

# Why an event is dropped, in build_user's order of checks (0 = kept).
_DROPS = ("", "dropped_missing_timestamp", "dropped_unknown_action", "dropped_unknown_ad",
          "dropped_ad_without_sid", "dropped_content_without_title", "dropped_cold_ad")
_COLD = _DROPS.index("dropped_cold_ad")
_LEGAL_KEYS = pa.array(sorted(f"{d}\x1f{a}" for d, a in _LEGAL), pa.string())
_ENGAGEMENTS = pa.array(sorted(ENGAGEMENTS), pa.string())


class _Columns:
    """The shard's sft, eval and dpo rows as column lists of ints where it can (split code,
    user, catalog rows; a DPO or eval row's prompt is the index of its target's main SFT row),
    turned into Arrow tables once, by ``take`` from the catalog's columns."""

    def __init__(self) -> None:
        self.s: tuple[list, ...] = ([], [], [], [], [], [])  # split, prompt, task, user, row, tpl
        self.e: tuple[list, ...] = ([], [], [], [], [], [])  # split, src, user, row, hist, seq
        self.d: tuple[list, ...] = ([], [], [], [], [], [])  # split, src, type, user, chosen, rej

    def sft(self, split: int, texts: list[str], user: int, row: int, tpl: int) -> int:
        """The main (and aux_titles, if ``texts`` has two) rows; the main row's index."""
        src = len(self.s[0])
        for text, task in zip(texts, ("main", "aux_titles")):
            for col, v in zip(self.s, (split, text, task, user, row, tpl)):
                col.append(v)
        return src

    def eval_row(self, split: int, src: int, user: int, row: int, hist: list[str],
                 seq: list[str]) -> None:
        for col, v in zip(self.e, (split, src, user, row, hist, seq)):
            col.append(v)

    def dpo(self, split: int, src: int, user: int, pairs: list[tuple[str, int, int]]) -> None:
        for kind, chosen, rejected in pairs:
            for col, v in zip(self.d, (split, src, kind, user, chosen, rejected)):
                col.append(v)

    def tables(self, catalog: Catalog, user_ids: list[str]) -> dict[tuple[str, str | None],
                                                                    pa.Table]:
        sid, ad = pa.array(catalog.sid, pa.string()), pa.array(catalog.ad_ids, pa.string())
        ecpm, users = pa.array(catalog.ecpm, pa.float64()), pa.array(user_ids, pa.string())
        prompts = pa.array(self.s[1], pa.string())

        def at(values: pa.Array, index: list[int]) -> pa.Array:
            return values.take(pa.array(index, pa.int64()))

        def sft(split, _, task, user, row, tpl):
            return {"prompt": prompts, "completion": at(sid, row), "task": task,
                    "user_id": at(users, user), "target_ad_id": at(ad, row),
                    "template": pa.array(tpl, pa.int32())}

        def eval_(split, src, user, row, hist, seq):
            return {"user_id": at(users, user), "prompt": at(prompts, src),
                    "target_ad_id": at(ad, row), "target_sid": at(sid, row),
                    "history_ad_ids": hist, "sequence_ad_ids": seq}

        def dpo(split, src, kind, user, chosen, rejected):
            return {"prompt": at(prompts, src), "chosen": at(sid, chosen),
                    "rejected": at(sid, rejected), "pair_type": kind,
                    "user_id": at(users, user), "chosen_ad_id": at(ad, chosen),
                    "rejected_ad_id": at(ad, rejected), "chosen_ecpm": at(ecpm, chosen),
                    "rejected_ecpm": at(ecpm, rejected)}

        out = {}
        for kind, make, rows in (("sft", sft, self.s), ("eval", eval_, self.e),
                                 ("dpo", dpo, self.d)):
            if not rows[0]:
                continue
            schema = OUTPUTS[kind][0]
            cols = make(*rows)
            table = pa.table({c: cols[c] for c in schema.names}, schema=schema)
            codes = np.asarray(rows[0])
            for code in np.unique(codes).tolist():
                out[(kind, SPLITS[code])] = table.filter(pa.array(codes == code))
        return out


def _profiles(users: pa.Table | None) -> dict[str, dict[str, Any] | None]:
    """user_id -> profile, exactly as the group-by path sees it (through its JSON row)."""
    if users is None or users.num_rows == 0:
        return {}
    rows = profile_batch(users)
    return dict(zip(rows.column("user_id").to_pylist(),
                    map(profile_from_json, rows.column("title").to_pylist())))


def _in_order(ev: pa.Table) -> bool:
    """Sorted by (user_id, ts) with no null time (what ingest promises)."""
    n = ev.num_rows
    if ev.column("ts").null_count:
        return False
    if n < 2:
        return True
    u0, u1 = ev.column("user_id").slice(0, n - 1), ev.column("user_id").slice(1)
    t0, t1 = ev.column("ts").slice(0, n - 1), ev.column("ts").slice(1)
    ok = pc.and_(pc.less_equal(u0, u1), pc.or_(pc.not_equal(u0, u1), pc.less_equal(t0, t1)))
    return bool(pc.all(pc.fill_null(ok, False)).as_py())


def _drop_reasons(ev: pa.Table, catalog: Catalog, has_sid: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reason code per event (index into _DROPS), catalog row or -1, is an ad event)."""
    def arr(x) -> np.ndarray:
        return pc.fill_null(x, False).to_numpy(zero_copy_only=False)

    domain, action = ev.column("domain"), ev.column("action")
    legal = arr(pc.is_in(pc.binary_join_element_wise(domain, action, "\x1f"), _LEGAL_KEYS))
    is_ad = arr(pc.equal(domain, "ad"))
    row = pc.fill_null(pc.index_in(ev.column("ad_id"), pa.array(catalog.ad_ids, pa.string())),
                       -1).to_numpy(zero_copy_only=False).astype(np.int64)
    sid_ok = (row >= 0) & has_sid[np.maximum(row, 0)]
    titled = arr(pc.greater(pc.utf8_length(ev.column("title")), 0))
    ts_null = ev.column("ts").is_null().to_numpy(zero_copy_only=False)
    reason = np.select([ts_null, ~legal, is_ad & (row < 0), is_ad & ~sid_ok, ~is_ad & ~titled],
                       [1, 2, 3, 4, 5], 0).astype(np.int64)
    return reason, row, is_ad


def _drop_cold(reason: np.ndarray, row: np.ndarray, is_ad: np.ndarray, is_eng: np.ndarray,
               user_of: np.ndarray, ts: np.ndarray, catalog: Catalog, plan: SplitPlan) -> None:
    """The cold-start split, in place: an event on a cold ad that is not a test target gets
    reason ``dropped_cold_ad`` (what :func:`leadre.prompts.examples.drop_cold` does per user:
    under leave-one-out the user's last engagement is kept, under the time split an
    engagement at or after ``test_start``)."""
    is_cold = np.array([*catalog.is_cold, False], bool)
    cold = (reason == 0) & is_ad & (row >= 0) & is_cold[np.maximum(row, 0)]
    if not cold.any():
        return
    if plan.mode == "leave_one_out":
        eng = np.flatnonzero((reason == 0) & is_eng)
        keep = np.zeros(len(reason), bool)
        keep[eng[np.append(user_of[eng][1:] != user_of[eng][:-1], True)]] = True
    else:
        keep = is_eng & (ts >= plan.test_start_ms)
    reason[cold & ~keep] = _COLD


def build_shard(events: pa.Table | None, users: pa.Table | None, catalog: Catalog,
                cfg: PromptConfig, plan: SplitPlan) -> tuple[dict[tuple[str, str | None],
                                                              pa.Table], Counter]:
    """Every row of one shard's users: public tables ((kind, split) -> table) and the flat
    counts (``kind/split/label`` -> n) that :func:`leadre.prompts.tables.route` would give."""
    notes, fallback = Counter(), Rows()
    profiles = _profiles(users)
    ev = events_batch(events) if events is not None else GROUP_SCHEMA.empty_table()
    order = None  # on-disk row of every sorted row, when the shard was not sorted
    if not _in_order(ev):  # a broken promise costs a sort, never a wrong row
        order = pc.sort_indices(ev, shards.SORT_KEYS)
        ev, raw_ev = ev.take(order), ev
        order = order.to_numpy()
    n = ev.num_rows
    uid = ev.column("user_id").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(uid[1:] != uid[:-1]) + 1 if n else np.zeros(0, np.int64)
    starts = np.concatenate([[0], starts]) if n else starts
    n_users = len(starts)
    user_of = np.repeat(np.arange(n_users), np.diff(np.append(starts, n)))
    user_ids = uid[starts].tolist() if n else []

    has_sid = np.array([s is not None for s in catalog.sid] or [False])
    reason, row, is_ad = _drop_reasons(ev, catalog, has_sid)
    is_eng = pc.fill_null(pc.is_in(ev.column("action"), _ENGAGEMENTS), False).to_numpy(
        zero_copy_only=False) & is_ad
    ts_all = pc.fill_null(ev.column("ts"), 0).to_numpy()
    if catalog.cold:
        _drop_cold(reason, row, is_ad, is_eng, user_of, ts_all, catalog, plan)
    drops = np.bincount(user_of * len(_DROPS) + reason,
                        minlength=n_users * len(_DROPS)).reshape(n_users, len(_DROPS))
    kept = np.flatnonzero(reason == 0)
    k_user, k_row = user_of[kept], row[kept]
    k_ts = ts_all[kept]
    n_kept = np.bincount(k_user, minlength=n_users)
    k_start = np.concatenate([[0], np.cumsum(n_kept)])
    k_eng = is_eng[kept]

    loo = plan.mode == "leave_one_out"
    eng = np.flatnonzero(k_eng)
    e_user, e_row = k_user[eng], k_row[eng]
    is_target = np.ones(len(eng), bool)
    if not loo and len(eng):
        is_target[1:] = (e_user[1:] != e_user[:-1]) | (e_row[1:] != e_row[:-1])
    t_idx = eng[is_target]  # kept-space index of every target
    t_user = k_user[t_idx]
    n_t = np.bincount(t_user, minlength=n_users)
    t_pos = t_idx - k_start[t_user]
    if loo:
        t_start = np.concatenate([[0], np.cumsum(n_t)])
        from_end = n_t[t_user] - 1 - (np.arange(len(t_idx)) - t_start[t_user])
        t_split = np.where(from_end == 0, 2, np.where(from_end == 1, 1, 0))
    else:
        t_split = np.searchsorted([plan.valid_start_ms, plan.test_start_ms], k_ts[t_idx],
                                  side="right")
        before = [np.bincount(k_user, weights=k_ts < edge, minlength=n_users).astype(np.int64)
                  for edge in (plan.valid_start_ms, plan.test_start_ms)]
    with_history = t_pos >= cfg.min_history
    n_hist = np.bincount(t_user[with_history], minlength=n_users)
    normal = (n_kept > 0) & (n_t > 0) & (n_hist > 0) & ((n_t >= 2) if loo else True)

    kept_ev = ev.take(pa.array(kept))
    ts_l, row_l = k_ts.tolist(), k_row.tolist()
    t_bounds = np.concatenate([[0], np.cumsum(n_t)]).tolist()
    t_pos_l, t_split_l, hist_l = t_pos.tolist(), t_split.tolist(), with_history.tolist()
    t_row_l = k_row[t_idx].tolist()
    e_bounds = np.concatenate([[0], np.cumsum(np.bincount(e_user, minlength=n_users))]).tolist()
    e_pos_l, e_row_l = (eng - k_start[e_user]).tolist(), e_row.tolist()
    k_start_l, n_kept_l = k_start.tolist(), n_kept.tolist()
    sid_of, title_of, cat_of = catalog.sid_of, catalog.title_of, catalog.category_of
    starts_l = np.append(starts, n).tolist()
    fast = (ShardPrompts(cfg, catalog, ts_l, *(kept_ev.column(c) for c in ("domain", "action")),
                         k_row, kept_ev.column("title")) if SUPPORTED and normal.any() else None)
    ad_ids = catalog.ad_ids
    out = _Columns()
    for u, user_id in enumerate(user_ids):
        profile = profiles.pop(user_id, None)
        if not normal[u]:
            # build_user sees the user's events as stored (its drop notes are in that order)
            raw = (ev.slice(starts_l[u], starts_l[u + 1] - starts_l[u]) if order is None else
                   raw_ev.take(pa.array(np.sort(order[starts_l[u]:starts_l[u + 1]]))))
            build_user(user_id, profile, list(map(Event, *(raw.column(c).to_pylist() for c in (
                "ts", "domain", "action", "ad_id", "title")))), catalog, cfg, plan, fallback)
            continue
        notes["users"] += 1
        for code in np.flatnonzero(drops[u, 1:]).tolist():
            notes[_DROPS[code + 1]] += int(drops[u, code + 1])
        k0, k1 = k_start_l[u], k_start_l[u] + n_kept_l[u]
        evs: list[Event] = []  # the user's events, for compose_prompt (rarely needed)
        if fast is not None:
            fast.start_user(profile, k0)
        ta, tb = t_bounds[u], t_bounds[u + 1]
        notes["targets_without_history"] += (tb - ta) - int(n_hist[u])
        if loo:
            pos = t_pos_l[ta:tb]
            ends = {"train": pos[-2], "valid": pos[-1], "test": k1 - k0}
        else:
            ends = {"train": int(before[0][u]), "valid": int(before[1][u]), "test": k1 - k0}
        ea, eb = e_bounds[u], e_bounds[u + 1]
        eng_u = list(zip(e_pos_l[ea:eb], e_row_l[ea:eb]))
        positives = {s: {r for p, r in eng_u if p < end} for s, end in ends.items()}
        targets = [(t_pos_l[i], t_split_l[i], t_row_l[i]) for i in range(ta, tb) if hist_l[i]]
        eval_at: dict[int, int] = {}
        for t, split, _ in targets:
            if split and split not in eval_at.values():
                eval_at[t] = split
        train = [t for t, s, _ in targets if s == 0]
        if train:
            eval_at[train[-1]] = 0
        all_targets = t_pos_l[ta:tb]
        for t, split, ad_row in targets:
            at = k0 + t
            ad_id, now = ad_ids[ad_row], ts_l[at]
            tpl = pick_template(cfg, user_id, ad_id)
            texts = []
            for titles in (False, True):
                if titles and not share_picked(cfg.aux_titles, cfg.seed, "titles", user_id,
                                               ad_id, now):
                    break
                if fast is not None:
                    p = fast.prompt(at, now, tpl, titles)
                else:
                    if not evs:
                        user = kept_ev.slice(k0, k1 - k0)
                        evs = list(map(Event, ts_l[k0:k1], *(user.column(c).to_pylist() for c in (
                            "domain", "action", "ad_id", "title"))))
                    p = compose_prompt(profile, evs, sid_of, title_of, cfg, now=now,
                                       ad_category_of=cat_of, template=tpl, use_titles=titles,
                                       presorted=True, content_of=catalog.content_of)
                if not titles:
                    notes["prompts_truncated"] += p.truncated
                    notes["prompts_over_budget"] += p.over_budget
                texts.append(p.text)
            src = out.sft(split, texts, u, ad_row, tpl)
            if eval_at.get(t) == split:
                hist = [ad_ids[row_l[k0 + i]] for i in all_targets if i < t]
                out.eval_row(split, src, u, ad_row,
                             hist[-cfg.max_events:] if cfg.max_events else [], hist)
            if share_picked(cfg.dpo_share, cfg.seed, "dpo", user_id, ad_id, now):
                rng = Rng(stable_hash(cfg.seed, "dpo", user_id, ad_id, now))
                out.dpo(split, src, u, dpo_pairs(ad_row, positives[SPLITS[split]], catalog,
                                                 cfg, rng, notes))
        notes["users_with_examples"] += 1
    for user_id in sorted(profiles):  # profiles without a single event
        build_user(user_id, profiles[user_id], [], catalog, cfg, plan, fallback)

    tables = out.tables(catalog, user_ids)
    flat: Counter = Counter()
    for (kind, split), t in tables.items():
        if kind not in LABEL_COLUMNS:  # eval rows have no label column; their label is "eval"
            flat[f"{kind}/{split or ''}/{kind}"] += t.num_rows
            continue
        for d in pc.value_counts(t.column(LABEL_COLUMNS[kind])).to_pylist():
            flat[f"{kind}/{split or ''}/{d['values']}"] += d["counts"]
    flat.update({f"note//{k}": v for k, v in notes.items() if v})
    more, c = route(fallback.to_arrow())
    flat.update(c)
    for key, t in more.items():
        tables[key] = pa.concat_tables([tables[key], t]) if key in tables else t
    return tables, flat


class ShardBuilder:
    """The ``map_batches`` UDF, as a pool of one actor per CPU: each row names a shard; read
    it, build, write its files and return its counts (JSON), so no example crosses the object
    store. Actors rather than tasks because a task pool leaves each worker idle between
    shards until the driver's scheduling loop hands it the next one (about 10% of a worker's
    time, measured); an actor has its next shard queued already, and keeps the catalog."""

    def __init__(self, ingest_dir: str, out: str, catalog_ref: list, cfg: PromptConfig,
                 plan: SplitPlan) -> None:
        import ray

        from leadre import artifacts

        # catalog_ref is a one-item list so Ray passes the reference, not the catalog
        self.catalog: Catalog = ray.get(catalog_ref[0])
        self.ingest_dir, self.cfg, self.plan = ingest_dir, cfg, plan
        self.fs, self.root = artifacts.resolve(out)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import time

        import pyarrow.parquet as pq
        import ray

        counts, times = [], []
        for k in batch.column("shard").to_pylist():
            t0 = time.time()
            tables, flat = build_shard(shards.read_shard(self.ingest_dir, "events", k),
                                       shards.read_shard(self.ingest_dir, "users", k),
                                       self.catalog, self.cfg, self.plan)
            for (kind, split), t in tables.items():
                d = split_path(self.root, kind, split)
                self.fs.create_dir(d, recursive=True)
                pq.write_table(t, f"{d}/{shards.shard_file(k)}", filesystem=self.fs)
            counts.append(json.dumps(flat))
            times.append((t0, time.time()))
        return pa.table({"counts": pa.array(counts, pa.string()),
                         "worker": pa.array([ray.get_runtime_context().get_actor_id()]
                                            * len(times), pa.string()),
                         "start": pa.array([a for a, _ in times], pa.float64()),
                         "end": pa.array([b for _, b in times], pa.float64())})


def worker_usage(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How busy the builders were, from each shard's (worker, start, end): the share of the
    span (first start to last end) that each worker spent building, on average, and the
    spread of shard times. A share well below 1 means workers waited (for the driver, for
    the tail shard), not that building was slow."""
    if not rows:
        return {"workers": 0}
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    busy: Counter = Counter()
    for r in rows:
        busy[r["worker"]] += r["end"] - r["start"]
    secs = sorted(r["end"] - r["start"] for r in rows)
    return {"workers": len(busy), "span_s": round(span, 2),
            "busy_share": round(sum(busy.values()) / (len(busy) * span), 3) if span else 1.0,
            "shard_s": {"min": round(secs[0], 3), "median": round(secs[len(secs) // 2], 3),
                        "max": round(secs[-1], 3)}}


def run_shards(cfg: PromptConfig, catalog: Catalog, plan: SplitPlan
               ) -> tuple[Counter, dict[str, Any]]:
    """Build and write every shard of ``cfg.ingest_dir`` on Ray Data; (flat counts, manifest
    fields: the shard count and :func:`worker_usage`). Logs progress as shards finish."""
    import time

    import ray

    ids = shards.shard_ids(cfg.ingest_dir)
    flat: Counter = Counter()
    if not ids:
        return flat, {"partitions": 0}
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items([{"shard": k} for k in ids], override_num_blocks=len(ids))
    result = ds.map_batches(
        ShardBuilder, batch_size=1, batch_format="pyarrow", num_cpus=1,
        # two shards in flight per actor: one running, one queued behind it
        compute=ray.data.ActorPoolStrategy(size=min(cpus, len(ids)),
                                           max_tasks_in_flight_per_actor=2),
        fn_constructor_kwargs={"ingest_dir": cfg.ingest_dir, "out": cfg.out,
                               "catalog_ref": [ray.put(catalog)], "cfg": cfg, "plan": plan})
    done, t0, last = [], time.perf_counter(), 0.0
    for r in result.iter_rows():
        flat.update(json.loads(r.pop("counts")))
        done.append(r)
        now = time.perf_counter() - t0
        if now - last >= 10 or len(done) == len(ids):  # a line every 10 s, and the last
            last = now
            log.info("prompts: %d/%d shards in %.0f s (~%.0f s left)", len(done), len(ids),
                     now, now / len(done) * (len(ids) - len(done)))
    return flat, {"partitions": len(ids), "shard_workers": worker_usage(done)}
