"""Stage 3 per user shard, without a shuffle: the engine ``shards`` of :func:`run_shards`.

Ingest writes events user-partitioned and sorted by (user_id, ts) (:mod:`leadre.data.shards`),
so one task can take shard k of events and of users, build every row of those users and
write them as ``<out>/<kind>/<split>/part-<k>.parquet``; only counts go back to the driver::

    shard ids ──map_batches(one shard per task: read, build_shard, write)── counts

:func:`build_shard` does per shard, with Arrow compute and numpy, what
:func:`leadre.prompts.examples.build_user` does per user in Python: dropping unusable events
(counted by reason), finding targets, splitting them, the visible window of every split and
which users are skipped. What is left per target (the prompt text, template and mixing
hashes, DPO sampling) uses the same functions as ``build_user``: :func:`compose_prompt` (the
one prompt implementation, also used online), :func:`pick_template`, :func:`share_picked`,
``_dpo_pairs``. A user who gets a ``skipped`` row goes through ``build_user`` itself, so rare
cases (and their detail strings) have one implementation. The output equals ``build_user``'s
row for row (tested).
"""

from __future__ import annotations

import json
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
from leadre.prompts.examples import (_LEGAL, Rng, Rows, SplitPlan, _dpo_pairs, build_user,
                                     pick_template, share_picked, stable_hash)
from leadre.prompts.render import Event, compose_prompt

# Why an event is dropped, in build_user's order of checks (0 = kept).
_DROPS = ("", "dropped_missing_timestamp", "dropped_unknown_action", "dropped_unknown_ad",
          "dropped_ad_without_sid", "dropped_content_without_title")
_LEGAL_KEYS = pa.array(sorted(f"{d}\x1f{a}" for d, a in _LEGAL), pa.string())
_ENGAGEMENTS = pa.array(sorted(ENGAGEMENTS), pa.string())
# public table -> the ROWS name of each of its columns, in order
_SOURCES = {kind: [renames.get(c, c) for c in schema.names]
            for kind, (schema, renames) in OUTPUTS.items()}


class Out:
    """Rows of one shard as column lists per public table ((kind, split) -> columns). Also a
    :class:`Rows` look-alike (``add``) for the shared DPO sampler."""

    def __init__(self) -> None:
        self.tables: dict[tuple[str, str | None], dict[str, list]] = {}

    def columns(self, kind: str, split: str | None) -> dict[str, list]:
        cols = self.tables.get((kind, split))
        if cols is None:
            cols = self.tables[(kind, split)] = {c: [] for c in OUTPUTS[kind][0].names}
        return cols

    def add(self, kind: str, split: str | None, label: str, user_id: str | None,
            **values: Any) -> None:
        values["label"], values["user_id"] = label, user_id
        get = values.get
        for col, source in zip(self.columns(kind, split).values(), _SOURCES[kind]):
            col.append(get(source))

    def to_arrow(self) -> dict[tuple[str, str | None], pa.Table]:
        return {key: pa.table(cols, schema=OUTPUTS[key[0]][0])
                for key, cols in self.tables.items()}


def _profiles(users: pa.Table | None) -> dict[str, dict[str, Any] | None]:
    """user_id -> profile, exactly as the group-by path sees it (through its JSON row)."""
    from leadre.prompts.pipeline import profile_batch, profile_from_json

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


def build_shard(events: pa.Table | None, users: pa.Table | None, catalog: Catalog,
                cfg: PromptConfig, plan: SplitPlan) -> tuple[dict[tuple[str, str | None],
                                                              pa.Table], Counter]:
    """Every row of one shard's users: public tables ((kind, split) -> table) and the flat
    counts (``kind/split/label`` -> n) that :func:`leadre.prompts.pipeline.route` would give."""
    from leadre.prompts.pipeline import GROUP_SCHEMA, events_batch, route

    out, notes, fallback = Out(), Counter(), Rows()
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
    drops = np.bincount(user_of * len(_DROPS) + reason,
                        minlength=n_users * len(_DROPS)).reshape(n_users, len(_DROPS))
    kept = np.flatnonzero(reason == 0)
    k_user, k_row = user_of[kept], row[kept]
    k_ts = pc.fill_null(ev.column("ts"), 0).to_numpy()[kept]
    n_kept = np.bincount(k_user, minlength=n_users)
    k_start = np.concatenate([[0], np.cumsum(n_kept)])
    k_eng = (pc.fill_null(pc.is_in(ev.column("action"), _ENGAGEMENTS), False).to_numpy(
        zero_copy_only=False) & is_ad)[kept]

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

    ts_l, ad_l = k_ts.tolist(), ev.column("ad_id").take(pa.array(kept)).to_pylist()
    evs_all = list(map(Event, ts_l, ev.column("domain").take(pa.array(kept)).to_pylist(),
                       ev.column("action").take(pa.array(kept)).to_pylist(), ad_l,
                       ev.column("title").take(pa.array(kept)).to_pylist()))
    t_bounds = np.concatenate([[0], np.cumsum(n_t)]).tolist()
    t_pos_l, t_split_l, hist_l = t_pos.tolist(), t_split.tolist(), with_history.tolist()
    t_row_l = k_row[t_idx].tolist()
    e_bounds = np.concatenate([[0], np.cumsum(np.bincount(e_user, minlength=n_users))]).tolist()
    e_pos_l, e_row_l = (eng - k_start[e_user]).tolist(), e_row.tolist()
    k_start_l, n_kept_l = k_start.tolist(), n_kept.tolist()
    sid, cols = catalog.sid, {s: out.columns("sft", s) for s in SPLITS}
    sid_of, title_of, cat_of = catalog.sid_of, catalog.title_of, catalog.category_of
    starts_l = np.append(starts, n).tolist()
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
        evs = evs_all[k_start_l[u]:k_start_l[u] + n_kept_l[u]]
        ta, tb = t_bounds[u], t_bounds[u + 1]
        notes["targets_without_history"] += (tb - ta) - int(n_hist[u])
        if loo:
            pos = t_pos_l[ta:tb]
            ends = {"train": pos[-2], "valid": pos[-1], "test": len(evs)}
        else:
            ends = {"train": int(before[0][u]), "valid": int(before[1][u]), "test": len(evs)}
        ea, eb = e_bounds[u], e_bounds[u + 1]
        eng_u = list(zip(e_pos_l[ea:eb], e_row_l[ea:eb]))
        positives = {s: {r for p, r in eng_u if p < end} for s, end in ends.items()}
        targets = [(t_pos_l[i], SPLITS[t_split_l[i]], t_row_l[i]) for i in range(ta, tb)
                   if hist_l[i]]
        eval_at: dict[int, str] = {}
        for t, split, _ in targets:
            if split != "train" and split not in eval_at.values():
                eval_at[t] = split
        train = [t for t, s, _ in targets if s == "train"]
        if train:
            eval_at[train[-1]] = "train"
        all_targets = t_pos_l[ta:tb]
        for t, split, ad_row in targets:
            target = evs[t]
            ad_id, now = target.ad_id, target.ts
            tpl = pick_template(cfg, user_id, ad_id)
            p = compose_prompt(profile, evs, sid_of, title_of, cfg, ad_category_of=cat_of,
                               now=now, template=tpl, presorted=True)
            notes["prompts_truncated"] += p.truncated
            notes["prompts_over_budget"] += p.over_budget
            c = cols[split]
            target_sid = sid[ad_row]
            for name, v in (("prompt", p.text), ("completion", target_sid), ("task", "main"),
                            ("user_id", user_id), ("target_ad_id", ad_id), ("template", tpl)):
                c[name].append(v)
            if share_picked(cfg.aux_titles, cfg.seed, "titles", user_id, ad_id, now):
                pt = compose_prompt(profile, evs, sid_of, title_of, cfg, ad_category_of=cat_of,
                                    now=now, template=tpl, use_titles=True, presorted=True)
                for name, v in (("prompt", pt.text), ("completion", target_sid),
                                ("task", "aux_titles"), ("user_id", user_id),
                                ("target_ad_id", ad_id), ("template", tpl)):
                    c[name].append(v)
            if eval_at.get(t) == split:
                hist = [evs[i].ad_id for i in all_targets if i < t]
                out.add("eval", split, "eval", user_id, prompt=p.text, target_ad_id=ad_id,
                        target_sid=target_sid,
                        history_ad_ids=hist[-cfg.max_events:] if cfg.max_events else [],
                        sequence_ad_ids=hist)
            if share_picked(cfg.dpo_share, cfg.seed, "dpo", user_id, ad_id, now):
                rng = Rng(stable_hash(cfg.seed, "dpo", user_id, ad_id, now))
                _dpo_pairs(out, p.text, user_id, split, ad_row, positives[split], catalog,
                           cfg, rng, notes)
        notes["users_with_examples"] += 1
    for user_id in sorted(profiles):  # profiles without a single event
        build_user(user_id, profiles[user_id], [], catalog, cfg, plan, fallback)

    tables = {k: t for k, t in out.to_arrow().items() if t.num_rows}
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


def build_shard_task(batch: pa.Table, ingest_dir: str, out: str, catalog_ref: list,
                     cfg: PromptConfig, plan: SplitPlan) -> pa.Table:
    """The ``map_batches`` UDF: each row names a shard; read it, build, write its files,
    return its counts (JSON) so no example crosses the object store."""
    import pyarrow.parquet as pq

    from leadre import artifacts
    from leadre.prompts.pipeline import _catalog

    catalog = _catalog(catalog_ref)
    fs, root = artifacts.resolve(out)
    counts = []
    for k in batch.column("shard").to_pylist():
        tables, flat = build_shard(shards.read_shard(ingest_dir, "events", k),
                                   shards.read_shard(ingest_dir, "users", k), catalog, cfg, plan)
        for (kind, split), t in tables.items():
            d = split_path(root, kind, split)
            fs.create_dir(d, recursive=True)
            pq.write_table(t, f"{d}/{shards.shard_file(k)}", filesystem=fs)
        counts.append(json.dumps(flat))
    return pa.table({"counts": pa.array(counts, pa.string())})


def run_shards(cfg: PromptConfig, catalog: Catalog, plan: SplitPlan) -> tuple[Counter, int]:
    """Build and write every shard of ``cfg.ingest_dir`` on Ray Data; (flat counts, shards)."""
    import ray

    ids = shards.shard_ids(cfg.ingest_dir)
    flat: Counter = Counter()
    if not ids:
        return flat, 0
    ds = ray.data.from_items([{"shard": k} for k in ids], override_num_blocks=len(ids))
    result = ds.map_batches(build_shard_task, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"ingest_dir": cfg.ingest_dir, "out": cfg.out,
                                       "catalog_ref": [ray.put(catalog)], "cfg": cfg,
                                       "plan": plan})
    for r in result.iter_rows():
        flat.update(json.loads(r["counts"]))
    return flat, len(ids)
