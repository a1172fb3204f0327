"""Stage 2, ``leadre sids``: ingest ``ads`` -> text embeddings -> residual quantisation ->
unique S-IDs, written as an artifact directory::

    <out>/sid_table/part-*.parquet   ad_id, codes, sid, active (+ version etc. in metadata)
    <out>/codebooks.safetensors      quantiser (codebooks; RQ-VAE weights)
    <out>/encoder/                   the fitted text encoder (serving embeds with it too)
    <out>/embeddings/part-*.parquet  ad_id, embedding (for the ScaNN index stage)
    <out>/titles/part-*.parquet      content title, embedding, codes, fallback reason
    <out>/sid_config.json            the SidConfig used
    <out>/manifest.json              inputs, counts, timings, version, quality report,
                                     cold_ads (the cold-start split, :func:`load_cold_ads`)

Only flags of *active* ads live in the trie, so it is rebuilt by :func:`load_trie` from the
table rather than stored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from leadre.artifacts import (ArtifactError, exists, join, read_manifest, read_table, timed,
                              write_json, write_manifest, write_table)
from leadre.sids.config import SidConfig
from leadre.sids.content import (FALLBACK_REASONS, TITLES, content_titles, fallback_vector,
                                 title_problem, titles_table, with_fallback)
from leadre.sids.encoder import (HfEncoder, LsaEncoder, TextEncoder, ad_texts, embed_texts,
                                 encoder_version)
from leadre.sids.quantize import CODEBOOKS_FILE, Quantizer, RqKMeans, RqVae, load_quantizer
from leadre.sids.report import collision_stats, level_stats, same_category_rate
from leadre.sids.table import SidTable, version_id
from leadre.sids.trie import SidTrie

log = logging.getLogger(__name__)
STAGE = "sids"
CONFIG_FILE = "sid_config.json"
# Fields that change where/how fast the stage runs but never which S-IDs it produces; they
# are left out of the version hash so the same S-IDs get the same version everywhere.
_EXECUTION_FIELDS = {"ingest_dir", "out", "embed_on", "embed_batch_size", "embed_actors",
                     "embed_cpus", "embed_gpus", "ray", "device", "model_cache", "titles",
                     "max_title_chars"}


def load_ads(ingest_dir: str) -> pa.Table:
    """The ingested ads, checked for what this stage relies on (ingest should guarantee it;
    a violation means a corrupt or hand-edited artifact, so it is an error, not a skip)."""
    read_manifest(ingest_dir, stage="ingest")
    ads = read_table(ingest_dir, "ads")
    missing = {"ad_id", "title", "active"} - set(ads.column_names)
    if missing:
        raise ArtifactError(f"{ingest_dir}/ads lacks column(s) {sorted(missing)}")
    if ads.num_rows == 0:
        raise ArtifactError(f"{ingest_dir}/ads is empty: there is nothing to assign S-IDs to")
    if ads.column("ad_id").null_count:
        raise ArtifactError(f"{ingest_dir}/ads has {ads.column('ad_id').null_count} null ad_id(s)")
    titles = pc.utf8_trim_whitespace(pc.fill_null(ads.column("title"), ""))
    empty = pc.equal(titles, "")
    if pc.any(empty).as_py():
        bad = ads.filter(empty).column("ad_id").to_pylist()[:5]
        raise ArtifactError(f"{ingest_dir}/ads: {pc.sum(empty).as_py()} ad(s) have an empty "
                            f"title (e.g. {bad}); re-run `leadre ingest`, which quarantines them")
    counts = pc.value_counts(ads.column("ad_id"))
    dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist()
    if dup:
        raise ArtifactError(f"{ingest_dir}/ads: {len(dup)} duplicate ad_id(s), e.g. {dup[:5]}; "
                            "every ad needs exactly one S-ID")
    if ads.column("active").null_count:
        raise ArtifactError(f"{ingest_dir}/ads has null `active` flags")
    return ads


def cold_mask(ads: pa.Table) -> np.ndarray:
    """Which ads the cold-start split holds out (the ingest ``ads`` table's ``cold`` column;
    all false for a table without one, e.g. from an older ingest)."""
    if "cold" not in ads.column_names:
        return np.zeros(ads.num_rows, bool)
    return np.asarray(pc.fill_null(ads.column("cold"), False).to_pylist(), bool)


def _cold_record(ad_ids: list[str], cold: np.ndarray) -> dict:
    """The manifest's record of the cold-start split (read back by :func:`load_cold_ads`)."""
    ids = sorted(a for a, c in zip(ad_ids, cold.tolist()) if c)
    return {"cold_ads": ids, "cold_split": {"cold_ads": len(ids),
                                            "warm_ads": len(ad_ids) - len(ids)}}


def make_encoder(cfg: SidConfig) -> TextEncoder:
    if cfg.encoder == "hf":
        return HfEncoder(cfg.model_path, cfg.max_length, device="cpu", cache_dir=cfg.model_cache)
    return LsaEncoder(cfg.embed_dim, cfg.hash_features, seed=cfg.seed, fit_sample=cfg.fit_sample)


def make_quantizer(cfg: SidConfig, n_items: int) -> Quantizer:
    k = cfg.codes_for(n_items)
    if cfg.quantizer == "rqkmeans":
        return RqKMeans(cfg.levels, k, cfg.seed, cfg.device, kmeans_iters=cfg.kmeans_iters,
                        threads=cfg.cpu_threads)
    return RqVae(cfg.levels, k, cfg.seed, cfg.device, hidden_dims=cfg.hidden_dims,
                 latent_dim=cfg.latent_dim, epochs=cfg.epochs, batch_size=cfg.batch_size,
                 lr=cfg.lr, beta=cfg.beta, kmeans_iters=cfg.kmeans_iters,
                 dead_code_reset=cfg.dead_code_reset, threads=cfg.cpu_threads)


def quality_report(codes: np.ndarray, table: SidTable, categories: list[str] | None) -> dict:
    """The numbers the issue asks for: per-level utilisation/entropy, collisions before the
    disambiguation level, and (with categories) first-level category agreement vs random."""
    report = {
        "levels": level_stats(codes, table.codebook_sizes[:-1]),
        "collisions_before_disambiguation": collision_stats(codes),
        "disambiguation_codes": table.codebook_sizes[-1],
        "unique_sids": int(len(set(map(tuple, table.codes.tolist())))) == len(table),
    }
    if categories is not None and codes.shape[1]:
        report["first_level_same_category"] = same_category_rate(codes[:, 0], categories)
    return report


def _embed(cfg: SidConfig, texts: list[str], encoder_dir: str) -> np.ndarray:
    if cfg.embed_on == "local":
        return embed_texts(texts, encoder_dir, on="local", batch_size=cfg.embed_batch_size)
    from leadre.runtime import init_ray

    init_ray(cfg.ray)
    return embed_texts(texts, encoder_dir, on="ray", batch_size=cfg.embed_batch_size,
                       actors=cfg.embed_actors, cpus_per_actor=cfg.embed_cpus,
                       gpus_per_actor=cfg.embed_gpus)


def _run_byo(cfg: SidConfig, timings: dict[str, float]) -> dict:
    with timed(timings, "load_index"):
        active, cold = None, {"cold_ads": [], "cold_split": {"cold_ads": 0}}
        if cfg.ingest_dir:
            ads = load_ads(cfg.ingest_dir)
            active = dict(zip(ads.column("ad_id").to_pylist(), ads.column("active").to_pylist()))
            cold = _cold_record(ads.column("ad_id").to_pylist(), cold_mask(ads))
        table = SidTable.from_index_json(cfg.index_json, active)
        if active is not None:
            missing = sorted(set(active) - set(table.ad_id_array.tolist()))
            if missing:
                raise ArtifactError(f"{len(missing)} ingested ad(s) have no S-ID in "
                                    f"{cfg.index_json}, e.g. {missing[:5]}")
    with timed(timings, "write"):
        table.save(cfg.out)
        write_json(cfg.out, CONFIG_FILE, dataclasses.asdict(cfg))
    codes = table.codes[:, :-1]
    report = quality_report(codes, table, None)
    # (bring-your-own S-IDs were made elsewhere: the split can only be recorded, not honoured)
    return _finish(cfg, table, report, timings, {"index_json": cfg.index_json}, cold=cold)


def _finish(cfg: SidConfig, table: SidTable, report: dict, timings: dict[str, float],
            inputs: dict, encoder: str | None = None, cold: dict | None = None) -> dict:
    with timed(timings, "trie"):
        trie = SidTrie.from_table(table)
    counts = {"ads": len(table), "active_ads": int(table.active.sum()),
              "sid_tokens": len(table.tokens()), "trie_nodes": trie.n_nodes}
    coll = report["collisions_before_disambiguation"]
    summary = {
        "out": cfg.out, "version": table.version, "ads": len(table),
        "active_ads": counts["active_ads"],
        "sid_example": table.sid(table.ad_id_array[0]) if len(table) else None,
        "codebook_sizes": table.codebook_sizes,
        "utilisation": [lvl["utilisation"] for lvl in report["levels"]],
        "entropy_norm": [lvl["entropy_norm"] for lvl in report["levels"]],
        "collision_rate": coll["collision_rate"],
        "max_disambiguation": table.codebook_sizes[-1] - 1,
        "encoder_version": encoder,
    }
    if "titles" in report:
        summary["content_titles"] = report["titles"]["titles"]
        summary["title_fallbacks"] = sum(report["titles"]["fallback"].values())
    if "first_level_same_category" in report:
        summary["first_level_same_category"] = report["first_level_same_category"]
    cold = cold or {"cold_ads": [], "cold_split": {"cold_ads": 0}}
    counts["cold_ads"] = cold["cold_split"]["cold_ads"]
    if counts["cold_ads"]:
        summary["cold_split"] = cold["cold_split"]
    return write_manifest(cfg.out, STAGE, inputs=inputs, config=cfg, counts=counts,
                          timings=timings, extra={"version": table.version,
                                                  "encoder_version": encoder,
                                                  "sid_meta": table.meta(),
                                                  "quality": report, "summary": summary,
                                                  **cold})


def run(cfg: SidConfig) -> dict:
    """Build the S-ID artifacts of ``cfg.ingest_dir`` (or ``cfg.index_json``) in ``cfg.out``."""
    timings: dict[str, float] = {}
    if cfg.index_json is not None:
        return _run_byo(cfg, timings)

    with timed(timings, "read"):
        ads = load_ads(cfg.ingest_dir)
        ad_ids = ads.column("ad_id").to_pylist()
        texts = ad_texts(ads)
        cold = cold_mask(ads)
        warm = np.flatnonzero(~cold)
    log.info("sids: %d ads from %s", len(ad_ids), cfg.ingest_dir)
    if cold.any():
        log.info("sids: cold-start split: the encoder and quantiser are fitted on the %d warm "
                 "ads; the %d cold ads are only encoded", len(warm), int(cold.sum()))

    encoder_dir = join(cfg.out, "encoder")
    with timed(timings, "encoder_fit"):
        # Fitted on the warm ads only (all of them without a cold-start split), so a cold ad
        # gets its vector and codes the way an ad added after training would.
        make_encoder(cfg).fit([texts[i] for i in warm]).save(encoder_dir)
    titles = content_titles(cfg.ingest_dir) if cfg.titles else []
    reasons = [title_problem(t, cfg.max_title_chars) for t in titles]
    good = [t for t, r in zip(titles, reasons) if r is None]
    log.info("sids: encoding %d ad texts and %d content titles", len(texts), len(good))
    with timed(timings, "embed"):
        # One pass (one actor pool) for ads and titles: the same frozen space.
        vecs = _embed(cfg, texts + good, encoder_dir)
        emb = vecs[:len(texts)]
        title_emb = with_fallback(reasons, vecs[len(texts):], fallback_vector(emb))
    with timed(timings, "quantize"):
        # (codebook size from the whole catalog: the split changes what is learned, not how much)
        quantizer = make_quantizer(cfg, len(ad_ids)).fit(emb[warm])
        codes = quantizer.encode(emb)
        title_codes = (quantizer.encode(title_emb) if titles
                       else np.zeros((0, cfg.levels), np.int64))

    config_json = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _EXECUTION_FIELDS}
    table = SidTable.from_codes(ad_ids, codes, quantizer.codebook_sizes,
                                ads.column("active").to_pylist())
    # Version = config + codebooks + the resulting assignment (same inputs, same version).
    table.version = version_id(
        json.dumps(config_json, sort_keys=True).encode(), quantizer.fingerprint(),
        "\n".join(map(str, table.ad_id_array)).encode(),
        np.ascontiguousarray(table.codes, dtype="<i4").tobytes())

    with timed(timings, "write"):
        table.save(cfg.out)
        quantizer.save(cfg.out)
        write_table(embeddings_table(ad_ids, emb), cfg.out, "embeddings")
        if titles:  # (an empty parquet dataset has no file to carry its schema)
            write_table(titles_table(titles, title_emb, title_codes, reasons), cfg.out, TITLES)
        write_json(cfg.out, CONFIG_FILE, dataclasses.asdict(cfg))

    categories = ads.column("category").to_pylist() if "category" in ads.column_names else None
    report = quality_report(codes, table, categories)
    if isinstance(quantizer, RqVae) and quantizer.history:
        report["rqvae_final_epoch"] = quantizer.history[-1]
    if cfg.titles:
        report["titles"] = {"titles": len(titles), "encoded": len(good),
                            "fallback": {r: reasons.count(r) for r in FALLBACK_REASONS}}
    inputs = {"ingest_dir": cfg.ingest_dir,
              "ingest_created_at": read_manifest(cfg.ingest_dir).get("created_at")}
    cold_info = _cold_record(ad_ids, cold)
    cold_info["cold_split"]["quantizer_fit_ads"] = len(warm)
    return _finish(cfg, table, report, timings, inputs, encoder_version(encoder_dir),
                   cold=cold_info)


def load_cold_ads(sids_dir: str) -> frozenset[str]:
    """The ads of the cold-start split (``IngestConfig.cold_fraction``) that the S-IDs of
    ``sids_dir`` were built with: held out of quantiser training, and of every training
    interaction downstream. Empty when the split is off or the manifest predates it. The one
    place later stages (prompts, eval) learn the cold set from."""
    return frozenset(read_manifest(sids_dir, stage=STAGE).get("cold_ads") or ())


def embeddings_table(ad_ids: Sequence[str], emb: np.ndarray) -> pa.Table:
    """The ``embeddings`` artifact: ad_id and its vector (float32, fixed size), as the stage
    writes it and ``leadre add-ads`` extends it."""
    return pa.table({"ad_id": pa.array(list(ad_ids), pa.string()),
                     "embedding": pa.FixedSizeListArray.from_arrays(
                         pa.array(np.asarray(emb, np.float32).ravel(), pa.float32()),
                         emb.shape[1])})


def load_table(sids_dir: str) -> SidTable:
    """The S-ID table of a ``leadre sids`` output directory."""
    read_manifest(sids_dir, stage=STAGE)
    return SidTable.load(sids_dir)


def load_code_vectors(sids_dir: str) -> dict[str, np.ndarray]:
    """S-ID token -> its quantiser code vector (``<b_6>``: level 1's codebook row 6), for the
    levels the quantiser learned; empty for bring-your-own S-IDs (no codebooks)."""
    if not exists(join(sids_dir, CODEBOOKS_FILE)):
        return {}
    table = load_table(sids_dir)
    books = load_quantizer(sids_dir, device="cpu").codebooks()
    return {table.token(level, k): books[level, k]
            for level in range(books.shape[0]) for k in range(books.shape[1])}


def load_trie(sids_dir: str, vocab: dict[str, int] | None = None) -> SidTrie:
    """A trie over the active ads of a ``leadre sids`` output (see ``SidTrie.from_table``)."""
    return SidTrie.from_table(load_table(sids_dir), vocab)
