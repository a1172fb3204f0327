"""The prompts artifact, as later stages see it: names, schemas, directory layout and the one
reader of a split. Only pyarrow and :mod:`leadre.artifacts` here (no Ray, no torch), so the
trainers, the evaluator and the builder workers can all import it cheaply::

    <prompts_dir>/sft/<split>/part-*.parquet    SFT: prompt, completion, task, user_id, ...
    <prompts_dir>/dpo/<split>/part-*.parquet    DPO: prompt, chosen, rejected, pair_type, ...
    <prompts_dir>/eval/<split>/part-*.parquet   EVAL: user_id, prompt, target_ad_id, ...
                                                (train: each user's last training target)
    <prompts_dir>/skipped/part-*.parquet        SKIPPED: user_id, reason, detail
    <prompts_dir>/manifest.json                 stage "prompts"
"""

from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from leadre import artifacts
from leadre.artifacts import ArtifactError

STAGE = "prompts"
SPLITS = ("train", "valid", "test")
TASKS = ("main", "aux_text2sid", "aux_sid2text", "aux_titles")
PAIR_TYPES = ("value", "interest_random", "interest_hard")

# The one schema every builder output row has (one table per user group); the pipeline
# routes rows by ``kind`` / ``split`` into the public tables below.
ROWS = pa.schema([
    ("kind", pa.string()),     # sft | dpo | eval | skipped | note
    ("split", pa.string()),
    ("label", pa.string()),    # task (sft), pair_type (dpo), reason (skipped, note)
    ("user_id", pa.string()),
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("target_ad_id", pa.string()),
    ("template", pa.int32()),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("chosen_ad_id", pa.string()),
    ("rejected_ad_id", pa.string()),
    ("chosen_ecpm", pa.float64()),
    ("rejected_ecpm", pa.float64()),
    ("target_sid", pa.string()),
    ("history_ad_ids", pa.list_(pa.string())),
    ("count", pa.int64()),
    ("detail", pa.string()),
    ("sequence_ad_ids", pa.list_(pa.string())),
])

SFT = pa.schema([("prompt", pa.string()), ("completion", pa.string()), ("task", pa.string()),
                 ("user_id", pa.string()), ("target_ad_id", pa.string()),
                 ("template", pa.int32())])
DPO = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
                 ("pair_type", pa.string()), ("user_id", pa.string()),
                 ("chosen_ad_id", pa.string()), ("rejected_ad_id", pa.string()),
                 ("chosen_ecpm", pa.float64()), ("rejected_ecpm", pa.float64())])
EVAL = pa.schema([("user_id", pa.string()), ("prompt", pa.string()),
                  ("target_ad_id", pa.string()), ("target_sid", pa.string()),
                  ("history_ad_ids", pa.list_(pa.string())),
                  ("sequence_ad_ids", pa.list_(pa.string()))])
# EVAL's two histories list the ad ids of the user's targets (ad engagements, as defined in
# leadre.prompts.examples) before the row's target, oldest first: ``history_ad_ids`` only the
# last ``max_events`` (the prompt's window), ``sequence_ad_ids`` all of them (what ID-based
# baselines train and rank on).
SKIPPED = pa.schema([("user_id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
# public table -> (schema, {public column: ROWS column})
OUTPUTS = {
    "sft": (SFT, {"task": "label"}),
    "dpo": (DPO, {"pair_type": "label"}),
    "eval": (EVAL, {}),
    "skipped": (SKIPPED, {"reason": "label"}),
}
# The public column that holds a table's ROWS ``label`` (what ``read_split(labels=)`` filters).
LABEL_COLUMNS = {kind: public for kind, (_, renames) in OUTPUTS.items()
                 for public, rows_column in renames.items() if rows_column == "label"}
# Every output directory the contract promises, written even when empty.
EXPECTED: list[tuple[str, str | None]] = [(kind, s) for kind in ("sft", "dpo", "eval")
                                          for s in SPLITS] + [("skipped", None)]
LAYOUT = {"sft": "sft/<split>/part-*.parquet", "dpo": "dpo/<split>/part-*.parquet",
          "eval": "eval/<split>/part-*.parquet", "skipped": "skipped/part-*.parquet"}


def split_path(root: str, kind: str, split: str | None = None) -> str:
    """``<root>/<kind>/<split>`` (``<root>/skipped`` for the table without splits)."""
    return artifacts.join(root, kind, split) if split else artifacts.join(root, kind)


def read_split(prompts_dir: str, kind: str, split: str | None = None,
               columns: Sequence[str] | None = None, *, labels: Sequence[str] | None = None,
               complete: bool = False, required: bool = True) -> pa.Table | None:
    """One output table of a ``leadre prompts`` directory, e.g. ``read_split(d, "sft", "train")``.

    ``columns``: the columns to return, which must all be present (default: the public
    schema, cast to it). ``labels``: keep only rows of these SFT tasks / DPO pair types /
    skip reasons. ``complete``: drop rows with a null in any returned column. A missing
    directory raises :class:`ArtifactError`, or returns None when not ``required``.
    """
    schema = OUTPUTS[kind][0]
    location = split_path(prompts_dir, kind, split)
    if not artifacts.exists(location):
        if not required:
            return None
        raise ArtifactError(f"{location} does not exist: is {prompts_dir} the output of "
                            "`leadre prompts`?")
    table = artifacts.read_table(location)
    wanted = list(schema.names if columns is None else columns)
    missing = set(wanted) - set(table.column_names)
    if missing:
        raise ArtifactError(f"{location} lacks column(s) {sorted(missing)}")
    if labels is not None:
        label = table.column(LABEL_COLUMNS[kind])
        table = table.filter(pc.is_in(label, pa.array(list(labels), pa.string())))
    table = table.select(wanted)
    if columns is None:
        table = table.cast(schema)
    if complete:
        for c in wanted:
            if table.column(c).null_count:
                table = table.filter(pc.is_valid(table.column(c)))
    return table


def read_manifest(prompts_dir: str) -> dict[str, Any]:
    """The manifest of a ``leadre prompts`` directory (ArtifactError if it is another stage's)."""
    return artifacts.read_manifest(prompts_dir, stage=STAGE)
