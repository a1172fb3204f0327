"""The example builder of stage 3, in plain Python: one user's events in, that user's SFT
examples, DPO pairs and evaluation rows out. No Ray here: the Ray Data pipeline
(``pipeline.py``) calls :func:`build_user` once per user group and the single-process
reference run (:func:`leadre.prompts.build_local`) calls the same function in a loop; every
main-task prompt comes from :func:`leadre.prompts.render.compose_prompt`, the function
serving uses too.

Definitions (the contract the trainers and the evaluator rely on):

* **Target**: an ad engagement (``click`` / ``conversion``) whose ad has an S-ID. Under the
  time split, an engagement on the same ad as the user's previous engagement (the conversion
  after its click, a double click) is folded into it, so "predict the ad you just clicked" is
  never a target. Under leave-one-out every interaction is a target, as the protocol says.
* **History of a target**: the user's events strictly before it (list order, which is time
  order). A target needs ``min_history`` of them.
* **Split of a target**: ``time``: train if it happened before ``valid_start``, valid if before
  ``test_start``, else test. ``leave_one_out``: the last target is test, the one before valid,
  the others (with a non-empty history) train.
* **Visible window of a split**: the events a split may know about: train sees events before
  the first valid event, valid before the first test event, test everything. DPO negatives
  avoid the user's engagements in the visible window; nothing later is ever read, which is
  what makes the training examples leak-free.
* **Evaluation rows** (``eval/<split>``): per user, the first valid target, the first test
  target and the last training target (split ``train``), each with the prompt of that target,
  ``history_ad_ids`` (the last ``max_events`` earlier targets' ads) and ``sequence_ad_ids``
  (all of them).
* **Relevant ad** (value pairs): an active ad with an S-ID and a known eCPM in the same category
  as the true target. A value pair is the target and one relevant ad, the higher eCPM chosen.
* **Cold ads** (the cold-start split, ``Catalog.cold``): every event on a cold ad is dropped
  (counted as ``dropped_cold_ad``) before targets are found, except a test target: under
  leave-one-out the user's last ad engagement, under the time split an engagement at or after
  ``test_start``. So a cold ad is never a training or valid target, never in a history, a
  ``sequence_ad_ids``, a DPO pair (not even as a negative) or an ad-level example; it is
  only ever a test target.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pyarrow as pa

from leadre.data.schema import DOMAIN_ACTIONS, ENGAGEMENTS
from leadre.prompts import templates as T
from leadre.prompts.catalog import Catalog
from leadre.prompts.config import PromptConfig
from leadre.prompts.contract import ROWS
from leadre.prompts.render import Event, compose_prompt

_LEGAL = {(d, a) for d, acts in DOMAIN_ACTIONS.items() for a in acts}


# --------------------------------------------------------------------------- hashing


def stable_hash(*parts: Any) -> int:
    """64-bit hash of ``parts`` that is the same in every process and on every machine
    (Python's ``hash`` is salted per process)."""
    data = "\x1f".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def share_picked(share: float, *parts: Any) -> bool:
    """Deterministic Bernoulli(share) keyed by ``parts``."""
    if share >= 1.0:
        return True
    if share <= 0.0:
        return False
    return stable_hash("share", *parts) < share * 2.0 ** 64


class Rng:
    """splitmix64: a tiny deterministic generator seeded by a stable hash (cheaper to seed
    than ``random.Random``, and independent of which worker builds the user)."""

    __slots__ = ("state",)

    def __init__(self, seed: int):
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n


def pick_template(cfg: PromptConfig, user_id: str | None, target_ad_id: str) -> int:
    """Template variant of an example: a hash of (seed, user, target) over the allowed ids."""
    ids = cfg.template_ids
    return ids[stable_hash(cfg.seed, "template", user_id, target_ad_id) % len(ids)]


# --------------------------------------------------------------------------- per-user rows


@dataclass
class SplitPlan:
    """How targets are split. ``time``: window starts in epoch ms; ``leave_one_out``: none."""

    mode: str  # "time" | "leave_one_out"
    valid_start_ms: int | None = None
    test_start_ms: int | None = None


class Rows:
    """Column-wise accumulator of :data:`ROWS` rows (one table per user group, or one for a
    whole single-process run)."""

    __slots__ = ("cols", "_rest")

    def __init__(self) -> None:
        self.cols: dict[str, list] = {f.name: [] for f in ROWS}
        self._rest = [(n, c) for n, c in self.cols.items()][4:]

    def add(self, kind: str, split: str | None, label: str, user_id: str | None, **values) -> None:
        c = self.cols
        c["kind"].append(kind)
        c["split"].append(split)
        c["label"].append(label)
        c["user_id"].append(user_id)
        get = values.get
        for name, col in self._rest:
            col.append(get(name))

    def __len__(self) -> int:
        return len(self.cols["kind"])

    def to_arrow(self) -> pa.Table:
        return pa.Table.from_pydict(self.cols, schema=ROWS)


def _note(rows: Rows, user_id: str, notes: Counter) -> None:
    for label, n in notes.items():
        if n:
            rows.add("note", None, label, user_id, count=n)


def clean_events(events: Sequence[Event], catalog: Catalog, notes: Counter) -> list[Event]:
    """Drop (and count, by reason) events the builder cannot use. Ingest already validated
    them; this guards against hand-made or stale inputs (e.g. a S-ID table from another
    catalog) so one bad user never fails the job."""
    out = []
    for e in events:
        if e.ts is None:
            notes["dropped_missing_timestamp"] += 1
        elif (e.domain, e.action) not in _LEGAL:
            notes["dropped_unknown_action"] += 1
        elif e.domain == "ad":
            i = catalog.index.get(e.ad_id) if e.ad_id is not None else None
            if i is None:
                notes["dropped_unknown_ad"] += 1
            elif catalog.sid[i] is None:
                notes["dropped_ad_without_sid"] += 1
            else:
                out.append(e)
        elif not e.title:
            notes["dropped_content_without_title"] += 1
        else:
            out.append(e)
    if any(out[i].ts > out[i + 1].ts for i in range(len(out) - 1)):
        out.sort(key=lambda e: e.ts)  # stable: equal times keep their order
    return out


def drop_cold(events: list[Event], catalog: Catalog, plan: "SplitPlan", notes: Counter
              ) -> list[Event]:
    """The cold-start split: drop (and count as ``dropped_cold_ad``) every event on a cold ad
    that is not a test target (see the module docstring). ``events`` come from
    :func:`clean_events` (every ad event names a catalog ad), in time order."""
    if not catalog.cold:
        return events
    cold, index = catalog.is_cold, catalog.index
    if plan.mode == "leave_one_out":
        last = next((i for i in range(len(events) - 1, -1, -1) if events[i].domain == "ad"
                     and events[i].action in ENGAGEMENTS), -1)
        keep = lambda i, e: i == last  # noqa: E731
    else:
        keep = lambda i, e: e.action in ENGAGEMENTS and e.ts >= plan.test_start_ms  # noqa: E731
    out = []
    for i, e in enumerate(events):
        if e.domain == "ad" and cold[index[e.ad_id]] and not keep(i, e):
            notes["dropped_cold_ad"] += 1
        else:
            out.append(e)
    return out


def _targets(events: list[Event], loo: bool) -> list[int]:
    """Indices of target events (see the module docstring)."""
    idx, last_ad = [], None
    for i, e in enumerate(events):
        if e.domain != "ad" or e.action not in ENGAGEMENTS:
            continue
        if loo or e.ad_id != last_ad:
            idx.append(i)
        last_ad = e.ad_id
    return idx


def _split_targets(events: list[Event], targets: list[int], plan: SplitPlan, min_history: int
                   ) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(target index, split) pairs and the visible end (event index) of each split."""
    n = len(events)
    if plan.mode == "leave_one_out":
        out: list[tuple[int, str]] = []
        if targets:
            out.append((targets[-1], "test"))
        if len(targets) >= 2:
            out.append((targets[-2], "valid"))
        out += [(t, "train") for t in targets[:-2]]
        out.sort()
        ends = {"train": targets[-2] if len(targets) >= 2 else (targets[-1] if targets else n),
                "valid": targets[-1] if targets else n, "test": n}
    else:
        vs, ts = plan.valid_start_ms, plan.test_start_ms

        def split_of(t_ms: int) -> str:
            return "train" if t_ms < vs else "valid" if t_ms < ts else "test"

        out = [(t, split_of(events[t].ts)) for t in targets]
        first_valid = next((i for i, e in enumerate(events) if e.ts >= vs), n)
        first_test = next((i for i, e in enumerate(events) if e.ts >= ts), n)
        ends = {"train": first_valid, "valid": first_test, "test": n}
    return [(t, s) for t, s in out if t >= min_history], ends


def _sample_other(rng: Rng, pool: list[int], avoid: set[int], tries: int = 24) -> int | None:
    """A uniformly random member of ``pool`` not in ``avoid`` (None if none is found)."""
    if not pool:
        return None
    if len(pool) <= 64:
        ok = [i for i in pool if i not in avoid]
        return ok[rng.below(len(ok))] if ok else None
    for _ in range(tries):
        i = pool[rng.below(len(pool))]
        if i not in avoid:
            return i
    return None


def dpo_pairs(target: int, positives: set[int], catalog: Catalog, cfg: PromptConfig, rng: Rng,
              notes: Counter) -> list[tuple[str, int, int]]:
    """The DPO pairs of one prompt: (pair type, chosen, rejected catalog rows)."""
    ecpm, pairs = catalog.ecpm, []
    avoid = positives | {target}
    for _ in range(cfg.dpo_random_negatives):
        neg = _sample_other(rng, catalog.candidates, avoid)
        if neg is None:
            notes["dpo_no_random_negative"] += 1
            continue
        avoid.add(neg)
        pairs.append(("interest_random", target, neg))
    for _ in range(cfg.dpo_hard_negatives):
        neg = _sample_other(rng, catalog.by_first.get(catalog.first_code[target], []), avoid)
        if neg is None:
            notes["dpo_no_hard_negative"] += 1
            continue
        avoid.add(neg)
        pairs.append(("interest_hard", target, neg))
    if not cfg.dpo_value_pairs:
        return pairs
    t_ecpm, cat = ecpm[target], catalog.category[target]
    if t_ecpm is None or cat is None:
        notes["dpo_value_unknown_ecpm" if t_ecpm is None else "dpo_value_unknown_category"] += 1
        return pairs
    pool = catalog.by_category.get(cat, [])
    used = {target}
    for _ in range(cfg.dpo_value_pairs):
        found = None
        for _ in range(24):
            other = _sample_other(rng, pool, used)
            if other is None:
                break
            used.add(other)
            hi, lo = (other, target) if ecpm[other] > t_ecpm else (target, other)
            if ecpm[hi] > (1.0 + cfg.value_margin) * ecpm[lo]:
                found = (hi, lo)
                break
        if found is None:
            notes["dpo_no_value_pair"] += 1
            continue
        pairs.append(("value", *found))
    return pairs


def build_user(user_id: str, profile: Mapping[str, Any] | None, events: Sequence[Event],
               catalog: Catalog, cfg: PromptConfig, plan: SplitPlan,
               rows: Rows | None = None) -> Rows:
    """All rows of one user: sft (main, aux_titles), dpo, eval, and skipped/note rows.

    ``events`` are the user's events (any order; epoch-ms ``ts``); never raises on bad data:
    unusable events are dropped and counted, a user without usable targets gets a ``skipped``
    row with the reason.
    """
    rows = rows if rows is not None else Rows()
    notes: Counter = Counter(users=1)
    loo = plan.mode == "leave_one_out"
    if not events:
        rows.add("skipped", None, "no_events", user_id, detail="profile only, no events")
        _note(rows, user_id, notes)
        return rows
    evs = drop_cold(clean_events(events, catalog, notes), catalog, plan, notes)
    if not evs:
        rows.add("skipped", None, "no_valid_events", user_id,
                 detail=f"all {len(events)} events were unusable: " + ", ".join(
                     f"{k[len('dropped_'):]}={v}" for k, v in notes.items() if k != "users"))
        _note(rows, user_id, notes)
        return rows
    targets = _targets(evs, loo)
    if not targets:
        rows.add("skipped", None, "no_engagements", user_id,
                 detail=f"{len(evs)} events, no click or conversion on an ad with an S-ID")
        _note(rows, user_id, notes)
        return rows
    if loo and len(targets) < 2:
        rows.add("skipped", None, "too_short", user_id,
                 detail=f"{len(targets)} interaction(s); leave-one-out needs 2 or more")
        _note(rows, user_id, notes)
        return rows
    split_targets, ends = _split_targets(evs, targets, plan, cfg.min_history)
    notes["targets_without_history"] += len(targets) - len(split_targets)
    if not split_targets:
        rows.add("skipped", None, "no_history", user_id,
                 detail=f"{len(targets)} target(s), none with {cfg.min_history} earlier event(s)")
        _note(rows, user_id, notes)
        return rows

    index, sid_of, title_of = catalog.index, catalog.sid_of, catalog.title_of
    # Engaged ads (catalog rows) in each split's visible window: never DPO negatives.
    positives = {s: {index[evs[i].ad_id] for i in range(end) if evs[i].domain == "ad"
                     and evs[i].action in ENGAGEMENTS} for s, end in ends.items()}
    # Evaluation rows: the first target of the valid and test windows (under leave-one-out,
    # the only one) and, for sequence baselines, the last training target (so a user with
    # training targets only still gives them a full sequence).
    eval_at: dict[int, str] = {}
    for t, split in split_targets:
        if split != "train" and split not in eval_at.values():
            eval_at[t] = split
    train_targets = [t for t, s in split_targets if s == "train"]
    if train_targets:
        eval_at[train_targets[-1]] = "train"

    for t, split in split_targets:
        target = evs[t]
        history = evs[:t]
        ad_row = index[target.ad_id]
        tpl = pick_template(cfg, user_id, target.ad_id)
        p = compose_prompt(profile, history, sid_of, title_of, cfg,
                           ad_category_of=catalog.category_of, now=target.ts, template=tpl,
                           content_of=catalog.content_of)
        notes["prompts_truncated"] += p.truncated
        notes["prompts_over_budget"] += p.over_budget
        target_sid = catalog.sid[ad_row]
        rows.add("sft", split, "main", user_id, prompt=p.text, completion=target_sid,
                 target_ad_id=target.ad_id, template=tpl)
        if share_picked(cfg.aux_titles, cfg.seed, "titles", user_id, target.ad_id, target.ts):
            pt = compose_prompt(profile, history, sid_of, title_of, cfg,
                                ad_category_of=catalog.category_of, now=target.ts,
                                template=tpl, use_titles=True, content_of=catalog.content_of)
            rows.add("sft", split, "aux_titles", user_id, prompt=pt.text,
                     completion=target_sid, target_ad_id=target.ad_id, template=tpl)
        if eval_at.get(t) == split:
            hist_ads = [evs[i].ad_id for i in targets if i < t]
            rows.add("eval", split, "eval", user_id, prompt=p.text, target_ad_id=target.ad_id,
                     target_sid=target_sid,
                     history_ad_ids=hist_ads[-cfg.max_events:] if cfg.max_events else [],
                     sequence_ad_ids=hist_ads)
        if share_picked(cfg.dpo_share, cfg.seed, "dpo", user_id, target.ad_id, target.ts):
            rng = Rng(stable_hash(cfg.seed, "dpo", user_id, target.ad_id, target.ts))
            sid, ecpm, ad_ids = catalog.sid, catalog.ecpm, catalog.ad_ids
            for kind, chosen, rejected in dpo_pairs(ad_row, positives[split], catalog, cfg,
                                                    rng, notes):
                rows.add("dpo", split, kind, user_id, prompt=p.text, chosen=sid[chosen],
                         rejected=sid[rejected], chosen_ad_id=ad_ids[chosen],
                         rejected_ad_id=ad_ids[rejected], chosen_ecpm=ecpm[chosen],
                         rejected_ecpm=ecpm[rejected])
    notes["users_with_examples"] += 1
    _note(rows, user_id, notes)
    return rows


def build_ad_rows(catalog: Catalog, cfg: PromptConfig, rows: Rows | None = None) -> Rows:
    """Ad-level auxiliary SFT examples (train split): ad text -> S-ID and S-ID -> ad text,
    for every warm ad with an S-ID picked by the mixing shares (a cold ad has none: the model
    meets its S-ID first as a test target; counted as ``cold_ads_without_ad_tasks``)."""
    rows = rows if rows is not None else Rows()
    n_variants = len(T.TEXT2SID_PROMPTS)
    skipped_cold = 0
    for i, ad in enumerate(catalog.ad_ids):
        sid = catalog.sid[i]
        if sid is None:
            continue
        if catalog.is_cold[i]:
            skipped_cold += 1
            continue
        title = catalog.title[i]
        cat = catalog.category[i] or T.UNKNOWN_CATEGORY
        v = stable_hash(cfg.seed, "aux_template", ad) % n_variants
        if share_picked(cfg.aux_text2sid, cfg.seed, "text2sid", ad):
            rows.add("sft", "train", "aux_text2sid", None, target_ad_id=ad, template=v,
                     prompt=T.TEXT2SID_PROMPTS[v].format(title=title, category=cat),
                     completion=sid)
        if share_picked(cfg.aux_sid2text, cfg.seed, "sid2text", ad):
            rows.add("sft", "train", "aux_sid2text", None, target_ad_id=ad, template=v,
                     prompt=T.SID2TEXT_PROMPTS[v % len(T.SID2TEXT_PROMPTS)].format(sid=sid),
                     completion=T.SID2TEXT_COMPLETION.format(title=title, category=cat))
    if skipped_cold:
        rows.add("note", None, "cold_ads_without_ad_tasks", None, count=skipped_cold)
    return rows

