"""New ads after training: S-IDs for ads the catalog gains later, without retraining.

An ad added to a built S-ID directory gets its vector from the stage's frozen encoder
(``<sids>/encoder``) and its codes from the trained quantiser (``codebooks.safetensors``),
loaded with the same loaders as everything else that codes unseen text
(:meth:`leadre.sids.content.ContentCodes.attach`). The S-ID table grows by a *pure append*:
no existing ad's codes change, and the table keeps its ``version`` — the S-ID language the
model learned — so models trained before load and serve as they did. The manifest records
each extension (``extensions: [{added, at, ads_before, ads_after}]``) and the catalog size.

**The disambiguation level is fixed.** The model knows ``codebook_sizes[-1]`` tokens there (the
largest collision group at build time): a new ad must not need a token the model lacks. Policy
(:func:`assign_sids`): the ad's quantiser codes; if that group is full, the next-nearest code of
the *last quantised level* (the residual's next-best codebook row, same earlier levels), and so
on until a group has a free slot; within a group, the lowest free disambiguation code. So the
first ``levels - 1`` codes always agree with what the quantiser gives the text, and the last
one is the nearest the catalog has room for. Only when every last-level code under the ad's
prefix is full (``K x codebook_sizes[-1]`` ads sharing ``levels - 1`` codes) is the ad refused:
rebuild the S-IDs then. New ads are placed in ad_id order, so the result does not depend on the
order of the request.

Bad input is refused before anything is written, all ads of a request together
(:class:`AdsRefused` names each ad and its reason): the ingest's row checks
(:func:`leadre.data.schema.validate_ads`: required fields, id rule, text over the limit, eCPM),
an id already in the catalog or given twice, undecodable text, and text the encoder maps to
nothing (an LSA encoder that knows none of its words).

Files an extension writes (:meth:`Extension.write`; :meth:`Extension.rollback` puts the old
ones back): ``sid_table``, ``embeddings``, ``added_ads`` (the added ads' catalog rows, their
S-ID and when), ``manifest.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from leadre.artifacts import (MANIFEST, ArtifactError, exists, join, read_json, read_manifest,
                              read_table, resolve, write_json, write_table)
from leadre.data.schema import TextLimits, validate_ads
from leadre.sids.content import title_problem
from leadre.sids.table import SidTable, format_sid

log = logging.getLogger(__name__)

ADDED = "added_ads"  # table of the ads added after the S-ID stage
LOCK_FILE = ".catalog.lock"
# Ids an extension lists in the manifest; the full list is the ``added_ads`` table.
MANIFEST_IDS = 1_000
ADDED_SCHEMA = pa.schema([
    pa.field("ad_id", pa.string(), nullable=False),
    pa.field("title", pa.string()),
    pa.field("description", pa.string()),
    pa.field("category", pa.string()),
    pa.field("advertiser", pa.string()),
    pa.field("ecpm", pa.float64()),
    pa.field("active", pa.bool_(), nullable=False),
    pa.field("sid", pa.string(), nullable=False),
    pa.field("added_at", pa.string(), nullable=False),
])


class AdsRefused(ArtifactError):
    """New ads that cannot be added; ``problems`` is ``[(ad, reason), ...]``. Nothing of the
    request was added."""

    def __init__(self, problems: Sequence[tuple[str, str]]):
        self.problems = list(problems)
        shown = "; ".join(f"ad {a}: {r}" for a, r in self.problems[:20])
        more = f"; and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(f"{len(self.problems)} new ad(s) refused, nothing was added: "
                         f"{shown}{more}")


def catalog_id(table: SidTable) -> str:
    """Identifies a catalog state: the S-ID version and how many ads it holds (extensions
    only append, so the count tells two states of one version apart)."""
    return f"{table.version}+{len(table)}"


def ingest_limits(sids_dir: str) -> TextLimits:
    """The text limits the catalog's ads were held to (the ingest stage's recorded config);
    the ingest defaults when the S-ID stage names no ingest directory."""
    ingest = (read_manifest(sids_dir).get("inputs") or {}).get("ingest_dir")
    cfg = {}
    if ingest and exists(join(ingest, MANIFEST)):
        cfg = read_manifest(ingest).get("config") or {}
    d = TextLimits()
    return TextLimits(int(cfg.get("max_title_chars") or d.titles),
                      int(cfg.get("max_description_chars") or d.descriptions),
                      int(cfg.get("max_field_chars") or d.fields))


def _label(ad_id, row: int) -> str:
    return repr(ad_id) if isinstance(ad_id, str) and ad_id.strip() else f"in row {row}"


def check_new_ads(ads, table: SidTable, limits: TextLimits) -> pa.Table:
    """The clean new ads (the ingest ``ads`` schema, ``active`` defaulting to true) of
    ``ads`` (a table, DataFrame or list of ad objects), or :class:`AdsRefused` listing every
    unusable one."""
    import pandas as pd

    if isinstance(ads, pa.Table):
        df = ads.to_pandas(types_mapper=None)
    else:
        df = pd.DataFrame(ads, dtype=object) if isinstance(ads, list) else ads.copy()
    df = df.reset_index(drop=True)
    if len(df) == 0:
        raise AdsRefused([("(none)", "the request holds no ads")])
    if "active" not in df.columns:
        df["active"] = True
    df["active"] = df["active"].astype(object).where(df["active"].notna(), True)
    raw_ids = df["ad_id"].tolist() if "ad_id" in df.columns else [None] * len(df)
    problems: list[tuple[int, str, str]] = []
    # (the quarantine keeps each rejected row as JSON, extra columns included: `_row` says
    # which one it was)
    checked = validate_ads(df.assign(_row=range(len(df))), limits)
    q = checked.quarantine
    for row, reason, detail in zip(q.column("row").to_pylist(), q.column("reason").to_pylist(),
                                   q.column("detail").to_pylist()):
        i = int(json.loads(row)["_row"])
        problems.append((i, _label(raw_ids[i], i), f"{detail} ({reason})"))
    seen: dict[str, int] = {}
    for i, a in enumerate(raw_ids):
        if isinstance(a, str) and a.strip():
            if a in seen:
                problems.append((i, _label(a, i), f"given twice (rows {seen[a]} and {i})"))
            seen.setdefault(a, i)
    known = table.rows_of(list(seen))
    for a, r in zip(seen, known):
        if r >= 0:
            problems.append((seen[a], _label(a, seen[a]),
                             f"already in the catalog with S-ID {table.sid(a)}"))
    clean = checked.clean
    for col in ("title", "description"):
        for a, text in zip(clean.column("ad_id").to_pylist(), clean.column(col).to_pylist()):
            if text and title_problem(text, len(text)) == "undecodable":
                problems.append((seen.get(a, -1), _label(a, seen.get(a, -1)),
                                 f"{col} is not valid text (undecodable characters)"))
    if problems:
        problems.sort(key=lambda p: p[0])
        raise AdsRefused([(label, why) for _, label, why in problems])
    return clean


def assign_sids(table: SidTable, ad_ids: Sequence[str], codes: np.ndarray,
                ranked: np.ndarray) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Full S-ID codes (n, levels + 1) of new ads, under the module's policy: quantiser codes
    ``codes`` (n, levels); ``ranked`` (n, K) the last level's codes nearest first. Returns the
    codes and the ads that found no free S-ID (their rows are -1)."""
    width = table.codebook_sizes[-1]
    used: dict[tuple[int, ...], set[int]] = {}
    for row in table.codes.tolist():
        used.setdefault(tuple(row[:-1]), set()).add(row[-1])
    out = np.full((len(ad_ids), table.levels), -1, np.int64)
    problems = []
    for i in sorted(range(len(ad_ids)), key=lambda j: ad_ids[j]):
        prefix = tuple(int(c) for c in codes[i, :-1])
        for last in ranked[i]:
            key = (*prefix, int(last))
            taken = used.setdefault(key, set())
            if len(taken) < width:
                e = next(k for k in range(width) if k not in taken)
                taken.add(e)
                out[i] = [*key, e]
                break
        else:
            problems.append((repr(ad_ids[i]), f"no free S-ID under {format_sid(prefix, table.prefixes)}: "
                             f"all {len(ranked[i])} last-level codes hold {width} ads each; "
                             "rebuild the S-IDs (`leadre sids`) and retrain"))
    return out, problems


@dataclass
class Extension:
    """A prepared extension of ``sids_dir`` (nothing written yet): the extended table, the
    embeddings and ``added_ads`` tables, the manifest, and what they replace."""

    sids_dir: str
    table: SidTable
    old_table: SidTable
    embeddings: pa.Table
    old_embeddings: pa.Table
    added: pa.Table
    old_added: pa.Table | None
    manifest: dict
    old_manifest: dict
    new_ids: list[str]

    @property
    def new_sids(self) -> list[str]:
        return self.table.sids(self.new_ids)

    def write(self) -> None:
        """Write the extension; on any failure the old files are put back."""
        try:
            self._write(self.table, self.embeddings, self.added, self.manifest)
        except BaseException:
            self.rollback()
            raise

    def rollback(self) -> None:
        """Put the catalog back as it was before :meth:`write`."""
        self._write(self.old_table, self.old_embeddings, self.old_added, self.old_manifest)

    def _write(self, table, embeddings, added, manifest) -> None:
        table.save(self.sids_dir)
        write_table(embeddings, self.sids_dir, "embeddings")
        if added is not None:
            write_table(added, self.sids_dir, ADDED)
        elif exists(join(self.sids_dir, ADDED)):
            fs, path = resolve(join(self.sids_dir, ADDED))
            fs.delete_dir(path)
        write_json(self.sids_dir, MANIFEST, manifest)


def prepare_extension(sids_dir: str, ads: pa.Table, limits: TextLimits | None = None,
                      now: datetime | None = None) -> Extension:
    """Validate ``ads`` against the catalog of ``sids_dir``, encode and quantise them and
    assign their S-IDs; writes nothing (:meth:`Extension.write` does). Raises
    :class:`AdsRefused` for unusable ads, :class:`ArtifactError` for a directory that
    cannot take new ads (bring-your-own S-IDs: no encoder or quantiser)."""
    from leadre.sids.ann import load_embeddings
    from leadre.sids.build import embeddings_table
    from leadre.sids.encoder import ad_texts, load_encoder
    from leadre.sids.quantize import CODEBOOKS_FILE, load_quantizer

    read_manifest(sids_dir, stage="sids")
    manifest = read_json(sids_dir, MANIFEST)  # as stored: a rollback writes it back
    table = SidTable.load(sids_dir)
    if not exists(join(sids_dir, CODEBOOKS_FILE)) or not exists(join(sids_dir, "encoder")):
        raise ArtifactError(f"{sids_dir} holds bring-your-own S-IDs (no encoder or quantiser): "
                            "new ads need S-IDs from their source, or a `leadre sids` build")
    clean = check_new_ads(ads, table, limits or ingest_limits(sids_dir))
    ids = clean.column("ad_id").to_pylist()

    encoder = load_encoder(join(sids_dir, "encoder"), device="cpu")
    quantizer = load_quantizer(sids_dir, device="cpu")
    if quantizer.codebook_sizes != table.codebook_sizes[:-1]:
        raise ArtifactError(f"{sids_dir}: the quantiser's codebooks {quantizer.codebook_sizes} "
                            f"do not match the S-ID table's {table.codebook_sizes[:-1]}")
    emb = np.asarray(encoder.encode(ad_texts(clean)), np.float32)
    empty = np.linalg.norm(emb, axis=1) < 1e-6
    if empty.any():
        raise AdsRefused([(repr(a), "the text encoder finds nothing in its text (no word it "
                           "knows): give it a title or description in the catalog's words")
                          for a, e in zip(ids, empty) if e])
    codes, ranked = quantizer.rank_last_level(emb)
    full, problems = assign_sids(table, ids, codes, ranked)
    if problems:
        raise AdsRefused(problems)

    active = clean.column("active").to_numpy(zero_copy_only=False)
    extended = SidTable(np.concatenate([table.ad_id_array, np.asarray(ids, dtype=object)]),
                        np.concatenate([table.codes, full.astype(np.int32)]),
                        np.concatenate([table.active, active]), table.codebook_sizes,
                        table.prefixes, table.version)
    old_ids, old_emb = load_embeddings(sids_dir)
    old_embeddings = embeddings_table(old_ids.tolist(), old_emb)
    embeddings = pa.concat_tables([old_embeddings, embeddings_table(ids, emb)])

    at = (now or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    rows = {c: clean.column(c) for c in ("ad_id", "title", "description", "category",
                                         "advertiser", "ecpm", "active")}
    rows["sid"] = pa.array(extended.sids(ids), pa.string())
    rows["added_at"] = pa.array([at] * len(ids), pa.string())
    new_added = pa.table(rows).cast(ADDED_SCHEMA)
    old_added = read_table(sids_dir, ADDED) if exists(join(sids_dir, ADDED)) else None
    added = new_added if old_added is None else pa.concat_tables(
        [old_added.cast(ADDED_SCHEMA), new_added])

    updated = json.loads(json.dumps(manifest))
    base = (updated.get("catalog") or {}).get("base_ads", len(table))
    updated["extensions"] = [*updated.get("extensions", []), {
        "added": sorted(ids)[:MANIFEST_IDS], "added_count": len(ids), "at": at,
        "ads_before": len(table), "ads_after": len(extended),
        "moved_to_next_code": int((full[:, -2] != codes[:, -1]).sum())}]
    updated["catalog"] = {"ads": len(extended), "base_ads": base,
                          "extensions": len(updated["extensions"]),
                          "id": catalog_id(extended)}
    counts = dict(updated.get("counts") or {})
    counts.update(ads=len(extended), active_ads=int(extended.active.sum()))
    updated["counts"] = counts
    return Extension(sids_dir, extended, table, embeddings, old_embeddings, added, old_added,
                     updated, manifest, ids)


@contextlib.contextmanager
def catalog_lock(sids_dir: str) -> Iterator[None]:
    """One extension of ``sids_dir`` at a time (an exclusive ``flock`` on a local directory;
    a remote one is not locked: extend it from one place)."""
    if "://" in str(sids_dir) and not str(sids_dir).startswith("file://"):
        yield
        return
    import fcntl

    path = os.path.join(str(sids_dir).removeprefix("file://"), LOCK_FILE)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
