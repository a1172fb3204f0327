"""Which rows ``leadre eval`` scores and what the baselines learn from, chosen so that every
method, and every prompt directory of one world, is measured alike:

* Rows: one per user of the split, in user-id order whatever the shard order; a sample keeps
  the users with the smallest stable hash of (seed, user id) (:func:`sample_users`), and
  :func:`user_set_hash` names the set, so equal hashes mean the same users were scored.
* Training sequences: each user's full ad sequence before its first evaluation target
  (:func:`train_sequences`), users with training targets only included.
* Early stopping never uses the scored rows (:func:`early_stopping_slice`).
* ``filter_history`` drops a row's earlier ads from any method's ranking
  (:func:`kept_after_history`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import pandas as pd

from leadre.artifacts import ArtifactError
from leadre.prompts.contract import read_split
from leadre.prompts.examples import stable_hash

EVAL_COLUMNS = ["user_id", "prompt", "target_ad_id", "history_ad_ids", "sequence_ad_ids"]
_LISTS = ("history_ad_ids", "sequence_ad_ids")
EARLY_STOP_ROWS = 5000  # SASRec scores this many early-stopping rows after every epoch


def load_eval_rows(prompts_dir: str, split: str, *, required: bool = True) -> pd.DataFrame | None:
    """The ``eval/<split>`` rows as a DataFrame of :data:`EVAL_COLUMNS`, histories as lists
    of ad ids, in user-id order whatever the shard order (None when the split is missing and
    not ``required``)."""
    try:
        table = read_split(prompts_dir, "eval", split, EVAL_COLUMNS, required=required)
    except ArtifactError as e:
        if "sequence_ad_ids" in str(e):
            raise ArtifactError(f"{e}: rebuild {prompts_dir} with this version of "
                                "`leadre prompts`") from None
        raise
    if table is None:
        return None
    rows = table.to_pandas()
    for c in _LISTS:
        rows[c] = rows[c].map(lambda h: [] if h is None else [str(a) for a in h])
    rows["user_id"] = rows["user_id"].astype(str)
    return rows.sort_values(["user_id", "target_ad_id"], kind="stable").reset_index(drop=True)


def sample_users(user_ids: Sequence[str], n: int | None, seed: int) -> np.ndarray:
    """Mask of the rows of the ``n`` users with the smallest stable hash of (seed, user id)
    (all rows when ``n`` is None or covers every user). Depends on the user ids only, not on
    row order, so two prompt directories of one world pick the same users."""
    users = [str(u) for u in user_ids]
    distinct = sorted(set(users))
    if n is None or n >= len(distinct):
        return np.ones(len(users), bool)
    keep = set(sorted(distinct, key=lambda u: (stable_hash(seed, "eval_sample", u), u))[:n])
    return np.array([u in keep for u in users], bool)


def user_set_hash(user_ids: Sequence[str]) -> str:
    """Short sha256 of the sorted distinct user ids: equal hashes = the same users scored."""
    joined = "\n".join(sorted({str(u) for u in user_ids}))
    return hashlib.sha256(joined.encode()).hexdigest()[:12]


def train_sequences(prompts_dir: str) -> tuple[dict[str, list[str]], pd.DataFrame | None]:
    """(user id -> full ad sequence before that user's first evaluation target, valid rows).

    The sequence is the ``valid`` row's ``sequence_ad_ids`` if the user has one, else the
    ``test`` row's, else the ``train`` row's plus its target (users with training targets
    only). Under the time split a valid row holds everything before the validation window;
    under leave-one-out the sequence minus its last two items."""
    found: dict[str, list[str]] = {}
    valid = None
    for split in ("valid", "test", "train"):
        rows = load_eval_rows(prompts_dir, split, required=False)
        if rows is None:
            continue
        if split == "valid":
            valid = rows
        seqs = rows["sequence_ad_ids"]
        if split == "train":
            seqs = [s + [str(t)] for s, t in zip(seqs, rows["target_ad_id"])]
        earliest: dict[str, list[str]] = {}
        for user, seq in zip(rows["user_id"], seqs):
            if user not in earliest or len(seq) < len(earliest[user]):
                earliest[user] = list(seq)
        for user, seq in earliest.items():
            found.setdefault(user, seq)
    if valid is None and not found:
        raise ArtifactError(f"{prompts_dir}/eval holds no valid, test or train rows")
    return {u: s for u, s in sorted(found.items()) if s}, valid


def early_stopping_slice(split: str, sequences: dict[str, list[str]], valid: pd.DataFrame | None,
                         seed: int, n: int = EARLY_STOP_ROWS
                         ) -> tuple[list[list[str]], tuple[list[list[str]], list[str]] | None,
                                    dict[str, Any]]:
    """(the sequences SASRec trains on, the (histories, targets) it early-stops on, the facts
    the report records).

    Scoring ``test``: the ``valid`` rows (disjoint from the test rows) with their full
    sequences; SASRec trains on every training sequence. Scoring ``valid``: those rows must
    not pick the epoch, so the last item of every training sequence is held out: SASRec
    trains on ``seq[:-1]`` and early-stops on (``seq[:-1]`` -> ``seq[-1]``). Either slice is
    cut to ``n`` users by :func:`sample_users`."""
    if split == "valid":
        users = [u for u, seq in sequences.items() if len(seq) >= 2]
        picked = [u for u, keep in zip(users, sample_users(users, n, seed)) if keep]
        stop = ([sequences[u][:-1] for u in picked], [sequences[u][-1] for u in picked])
        return ([seq[:-1] for seq in sequences.values()], stop,
                {"slice": "train_last_item", "rows": len(picked)})
    fit = list(sequences.values())
    if valid is None or not len(valid):
        return fit, None, {"slice": None, "rows": 0}
    v = valid[sample_users(valid["user_id"], n, seed)]
    return fit, (v["sequence_ad_ids"].tolist(), v["target_ad_id"].astype(str).tolist()), \
        {"slice": "valid_rows", "rows": len(v)}


def kept_after_history(recs: Sequence[Sequence[str]], histories: Sequence[Sequence[str]],
                       k: int) -> list[list[int]]:
    """Per row, the positions of the first ``k`` recommended ads not in that row's history
    (what ``filter_history`` keeps, for every method alike)."""
    out = []
    for rec, hist in zip(recs, histories):
        seen = set(hist)
        out.append([j for j, a in enumerate(rec) if a not in seen][:k])
    return out
