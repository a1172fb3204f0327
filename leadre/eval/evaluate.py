"""Stage 6, ``leadre eval``: constrained generation for every eval user, metrics, baselines on
the same split, and a report (JSON + Markdown + PNG plots).

Reads:
    ``<prompts_dir>/eval/<split>``  user_id, prompt, target_ad_id, target_sid, history_ad_ids
    ``<model_dir>``                 a ``leadre sft`` / ``leadre dpo`` output (or any HF dir)
    ``<sids_dir>``                  S-ID table (+ ``embeddings`` for the ANN baseline)
    ``<ingest_dir>/ads``            category and eCPM for the beyond-accuracy metrics
Writes (``out``):
    ``metrics.json``  every metric of every method, plus generation stats (invalid rate, rows/s)
    ``report.md``     the Markdown table
    ``metric_vs_k.png``, ``comparison.png``
    ``recommendations/``  per eval row and LLM method: the top-K ad ids, S-IDs and scores
    ``manifest.json`` (stage ``eval``)

Generation for many users runs on Ray Data: ``map_batches`` over the prompts with an actor
pool, each actor holding one copy of the model (``actors``, ``gpus_per_actor``).

Baselines train on the histories that end before the first evaluation target of each user
(the ``valid`` rows' ``history_ad_ids``; users without a valid row contribute the history of
their earliest ``test`` row), and SASRec early-stops on the ``valid`` rows. Every method ranks
only active ads, like the trie.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from leadre.artifacts import (ArtifactError, exists, join, read_manifest, read_table,
                              timed, write_json, write_manifest, write_table, write_text)
from leadre.config import ConfigError
from leadre.eval import report
from leadre.prompts.contract import read_split
from leadre.runtime import RayConfig

log = logging.getLogger(__name__)
STAGE = "eval"


@dataclass
class EvalConfig:
    """Configuration of stage 6, ``leadre eval``.

    Inputs:
        prompts_dir: output of ``leadre prompts`` (its ``eval/<split>`` rows are scored).
        model_dir: a ``leadre sft`` / ``leadre dpo`` output to evaluate; null = baselines only.
        compare_dirs: more training outputs scored on the same rows (e.g. the SFT model next
            to the DPO one) for the per-stage comparison.
        sids_dir / ingest_dir: default to the ones recorded in the prompts manifest.
    Rows:
        split: ``test`` (report) or ``valid`` (tuning). max_rows: a seeded sample of the rows
        (null = all).
    Decoding: beam_size, top_k (= the largest K), batch_size, max_prompt_tokens, device.
    Execution: generate_on ``ray`` (Ray Data actor pool; ``actors`` model copies with
        ``cpus_per_actor`` / ``gpus_per_actor`` each) or ``local`` (this process).
    Baselines: any of most_popular, sasrec, embedding_ann, random. ``sasrec`` overrides
        fields of :class:`leadre.eval.baselines.SasrecConfig`; ``sasrec_grid`` lists override sets
        tried on the valid rows (the best by NDCG@10 is reported).
    """

    prompts_dir: str = field(default="runs/prompts", metadata={
        "help": "output directory of `leadre prompts`"})
    model_dir: str | None = field(default="runs/sft", metadata={
        "help": "output of `leadre sft` or `leadre dpo` to evaluate (null: baselines only)"})
    compare_dirs: list[str] = field(default_factory=list, metadata={
        "help": "more sft/dpo outputs scored on the same rows (per-stage comparison)"})
    sids_dir: str | None = field(default=None, metadata={
        "help": "output of `leadre sids` (default: the one the prompts were built with)"})
    ingest_dir: str | None = field(default=None, metadata={
        "help": "output of `leadre ingest` for categories/eCPM (default: from the prompts manifest)"})
    out: str = field(default="runs/eval", metadata={"help": "report directory to write"})
    split: Literal["valid", "test"] = field(default="test", metadata={"help": "eval rows to score"})
    max_rows: int | None = field(default=None, metadata={
        "help": "score a seeded sample of this many rows (null: all)"})
    ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10], metadata={
        "help": "cut-offs K of every @K metric"})
    beam_size: int = field(default=20, metadata={"help": "beams per prompt"})
    batch_size: int = field(default=32, metadata={"help": "prompts decoded together"})
    max_prompt_tokens: int = field(default=1024, metadata={"help": "longer prompts keep their end"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto: CUDA when available"})
    generate_on: Literal["ray", "local"] = field(default="ray", metadata={
        "help": "ray: Ray Data map_batches with an actor pool; local: in this process"})
    actors: int = field(default=1, metadata={"help": "model copies in the actor pool"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs per generation actor"})
    gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per generation actor"})
    baselines: list[str] = field(default_factory=lambda: ["most_popular", "sasrec", "embedding_ann"],
                                 metadata={"help": "baselines to run: names of leadre.eval.baselines.BASELINES"})
    sasrec: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "SasrecConfig overrides, e.g. {dim: 64, dropout: 0.3}"})
    sasrec_grid: list[dict[str, Any]] = field(default_factory=list, metadata={
        "help": "SasrecConfig override sets tried on the valid rows; the best is reported"})
    seed: int = field(default=0, metadata={"help": "seed for sampling rows and baselines"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={
        "help": "how to reach Ray (set ray.address=auto under `ray job submit`)"})

    def __post_init__(self) -> None:
        from leadre.eval.baselines import BASELINES, SasrecConfig

        bad = sorted(set(self.baselines) - set(BASELINES))
        if bad:
            raise ConfigError(f"eval: unknown baseline(s) {bad}; valid: {list(BASELINES)}")
        if not self.ks or min(self.ks) < 1:
            raise ConfigError("eval: ks must be a non-empty list of positive cut-offs")
        if max(self.ks) > self.beam_size:
            raise ConfigError(f"eval: the largest K ({max(self.ks)}) exceeds beam_size "
                              f"({self.beam_size}); raise beam_size")
        if self.actors < 1 or self.batch_size < 1:
            raise ConfigError("eval: actors and batch_size must be >= 1")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError("eval: max_rows must be >= 1 (or null for all rows)")
        known = {f.name for f in dataclasses.fields(SasrecConfig)}
        for overrides in [self.sasrec, *self.sasrec_grid]:
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise ConfigError(f"eval: unknown SASRec option(s) {unknown}; valid: {sorted(known)}")

    def generate_config(self):
        from leadre.eval.generate import GenerateConfig

        return GenerateConfig(beam_size=self.beam_size, top_k=max(self.ks),
                              max_prompt_tokens=self.max_prompt_tokens,
                              batch_size=self.batch_size, device=self.device)


# --- inputs -------------------------------------------------------------------------------

def _input_dir(manifest: dict, key: str) -> str | None:
    for section in ("inputs", "config"):
        value = (manifest.get(section) or {}).get(key)
        if isinstance(value, str):
            return value
    return None


EVAL_COLUMNS = ["user_id", "prompt", "target_ad_id", "history_ad_ids"]


def load_eval_rows(prompts_dir: str, split: str, *, required: bool = True) -> pd.DataFrame | None:
    """The ``eval/<split>`` rows as a DataFrame of :data:`EVAL_COLUMNS`, each history a list
    of ad ids (None when the split is missing and not ``required``)."""
    table = read_split(prompts_dir, "eval", split, EVAL_COLUMNS, required=required)
    if table is None:
        return None
    rows = table.to_pandas()
    rows["history_ad_ids"] = rows["history_ad_ids"].map(
        lambda h: [] if h is None else [str(a) for a in h])
    return rows.reset_index(drop=True)


def train_sequences(prompts_dir: str) -> tuple[list[list[str]], pd.DataFrame | None]:
    """Per-user ad sequences that end before any evaluation target, and the valid rows.

    The earliest ``valid`` row of a user holds everything before the validation window (time
    split) or the sequence minus its last two items (leave-one-out); users with no valid row
    contribute the history of their earliest ``test`` row."""
    parts = []
    valid = None
    for split in ("valid", "test"):
        rows = load_eval_rows(prompts_dir, split, required=False)
        if rows is None:
            continue
        if split == "valid":
            valid = rows
        rows = rows.assign(_n=rows["history_ad_ids"].map(len), _split=split)
        parts.append(rows[["user_id", "history_ad_ids", "_n", "_split"]])
    if not parts:
        raise ArtifactError(f"{prompts_dir}/eval holds neither valid nor test rows")
    allr = pd.concat(parts, ignore_index=True)
    allr["_order"] = (allr["_split"] == "test").astype(int)
    first = allr.sort_values(["user_id", "_order", "_n"], kind="stable").drop_duplicates("user_id")
    return [h for h in first["history_ad_ids"] if h], valid


def load_catalog_stats(ingest_dir: str | None, table, popularity: dict[str, int]):
    """The :class:`~leadre.eval.metrics.CatalogStats` of the ingest ads (empty maps without
    them), the S-ID table's active count and ``popularity``."""
    from leadre.eval.metrics import CatalogStats

    category: dict[str, str] = {}
    ecpm: dict[str, float] = {}
    if ingest_dir and exists(join(ingest_dir, "ads")):
        ads = read_table(ingest_dir, "ads").to_pandas()
        if "category" in ads:
            category = dict(zip(ads["ad_id"].astype(str), ads["category"].astype(str)))
        if "ecpm" in ads and ads["ecpm"].notna().any():
            ecpm = {a: float(v) for a, v in zip(ads["ad_id"].astype(str), ads["ecpm"]) if pd.notna(v)}
    return CatalogStats(category=category, ecpm=ecpm, popularity=popularity,
                        n_active=int(table.active.sum()))


# --- generation ---------------------------------------------------------------------------

def _ray_actor_cpus() -> float | None:
    """The CPUs Ray gave this actor; None outside a Ray actor (asking Ray anything while it
    is not initialised would start a cluster)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    return ctx.get_assigned_resources().get("CPU", 1) if ctx.get_actor_id() else None


class GenerateBatch:
    """Ray Data actor: holds one :class:`SidGenerator`; maps a batch of prompts to top-K."""

    def __init__(self, model_dir: str, sids_dir: str, gen_cfg: dict[str, Any]):
        import torch

        from leadre.eval.generate import GenerateConfig, SidGenerator

        cpus = _ray_actor_cpus()
        if cpus is not None:  # Ray caps actor threads at their CPU share: use that share
            torch.set_num_threads(max(1, int(round(cpus))))
        self.gen = SidGenerator.from_stage_dir(model_dir, sids_dir, GenerateConfig(**gen_cfg))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = self.gen.generate(batch["prompt"].tolist())
        return pd.DataFrame({
            "row": batch["row"].to_numpy(),
            "rec_ad_ids": [[c.ad_id for c in cands] for cands in out],
            "rec_sids": [[c.sid for c in cands] for cands in out],
            "rec_scores": [[c.score for c in cands] for cands in out],
        })


def generate_all(cfg: EvalConfig, model_dir: str, sids_dir: str, prompts: list[str]
                 ) -> pd.DataFrame:
    """Top-K for every prompt (columns row, rec_ad_ids, rec_sids, rec_scores), input order."""
    gen_cfg = dataclasses.asdict(cfg.generate_config())
    frame = pd.DataFrame({"row": np.arange(len(prompts)), "prompt": prompts})
    if cfg.generate_on == "local":
        res = GenerateBatch(model_dir, sids_dir, gen_cfg)(frame)
    else:
        import ray

        from leadre.runtime import init_ray

        init_ray(cfg.ray)
        # Sort by prompt length so each batch pads little; blocks keep actors busy.
        frame = frame.iloc[np.argsort(frame["prompt"].str.len().to_numpy(), kind="stable")]
        n_blocks = max(1, min(len(frame) // cfg.batch_size, cfg.actors * 4))
        ds = ray.data.from_pandas(frame).repartition(n_blocks)
        res = ds.map_batches(
            GenerateBatch, fn_constructor_kwargs={"model_dir": model_dir, "sids_dir": sids_dir,
                                                  "gen_cfg": gen_cfg},
            batch_size=cfg.batch_size * 4, batch_format="pandas", concurrency=cfg.actors,
            num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None).to_pandas()
    return res.sort_values("row").reset_index(drop=True)


# --- baselines ----------------------------------------------------------------------------

def run_baselines(cfg: EvalConfig, rows: pd.DataFrame, table, sids_dir: str,
                  sequences: list[list[str]], valid: pd.DataFrame | None, k: int,
                  timings: dict[str, float]) -> tuple[dict[str, list[list[str]]], dict[str, Any]]:
    """Each of ``cfg.baselines`` built by its :data:`leadre.eval.baselines.BASELINES` factory,
    then asked for the top ``k`` of every eval row."""
    import torch

    from leadre.eval.baselines import BASELINES, BaselineInputs, SasrecConfig

    vrows = valid if valid is not None and len(valid) else None
    if vrows is not None and len(vrows) > 5000:
        vrows = vrows.sample(5000, random_state=cfg.seed)
    inputs = BaselineInputs(
        item_ids=[str(a) for a in table.ad_id_array],
        active_ids=[str(a) for a in table.ad_id_array[table.active]],
        sequences=sequences, sids_dir=sids_dir, seed=cfg.seed,
        valid=None if vrows is None else (vrows["history_ad_ids"].tolist(),
                                          vrows["target_ad_id"].astype(str).tolist()),
        device="cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu",
        sasrec=SasrecConfig(**{**cfg.sasrec, "seed": cfg.seed}), sasrec_grid=cfg.sasrec_grid)
    histories = rows["history_ad_ids"].tolist()
    recs: dict[str, list[list[str]]] = {}
    info: dict[str, Any] = {}
    for name in cfg.baselines:
        with timed(timings, f"baseline_{name}"):
            model, facts = BASELINES[name](inputs)
            if facts:
                info[name] = facts
            if model is not None:
                recs[name] = model.recommend(histories, k)
    return recs, info


# --- report -------------------------------------------------------------------------------

def method_name(model_dir: str, taken: set[str]) -> str:
    try:
        stage = read_manifest(model_dir).get("stage", "model")
    except ArtifactError:
        stage = "model"
    name = f"leadre-{stage}"
    if name in taken:
        name = f"{name}({model_dir.rstrip('/').rsplit('/', 1)[-1]})"
    return name


# --- stage --------------------------------------------------------------------------------

def run(cfg: EvalConfig) -> dict[str, Any]:
    from leadre.eval.generate import invalid_rate
    from leadre.eval.metrics import all_metrics
    from leadre.sids.build import load_table

    timings: dict[str, float] = {}
    pm = read_manifest(cfg.prompts_dir, stage="prompts")
    sids_dir = cfg.sids_dir or _input_dir(pm, "sids_dir")
    ingest_dir = cfg.ingest_dir or _input_dir(pm, "ingest_dir")
    if not sids_dir:
        raise ConfigError("eval: sids_dir is not set and the prompts manifest does not name one")
    with timed(timings, "read"):
        table = load_table(sids_dir)
        if pm.get("sid_version") and table.version and pm["sid_version"] != table.version:
            raise ArtifactError(f"the prompts in {cfg.prompts_dir} were built with S-ID version "
                                f"{pm['sid_version']}, {sids_dir} holds {table.version}")
        rows = load_eval_rows(cfg.prompts_dir, cfg.split)
        if cfg.max_rows is not None and len(rows) > cfg.max_rows:
            rows = rows.sample(cfg.max_rows, random_state=cfg.seed).reset_index(drop=True)
        sequences, valid = train_sequences(cfg.prompts_dir)
        popularity: dict[str, int] = {}
        for s in sequences:
            for a in s:
                popularity[a] = popularity.get(a, 0) + 1
        catalog = load_catalog_stats(ingest_dir, table, popularity)
    targets = rows["target_ad_id"].astype(str).tolist()
    k = max(cfg.ks)
    log.info("eval: %d %s rows, %d active ads", len(rows), cfg.split, int(table.active.sum()))

    methods: dict[str, dict[str, float]] = {}
    generation: dict[str, Any] = {}
    rec_tables = []
    model_dirs = [d for d in [cfg.model_dir, *cfg.compare_dirs] if d]
    for model_dir in model_dirs:
        name = method_name(model_dir, set(methods))
        t0 = time.perf_counter()
        res = generate_all(cfg, model_dir, sids_dir, rows["prompt"].tolist())
        secs = time.perf_counter() - t0
        timings[f"generate_{name}"] = secs
        sids = [s for lst in res["rec_sids"] for s in lst]
        generation[name] = {
            "model_dir": model_dir, "rows": len(res), "seconds": round(secs, 3),
            "rows_per_s": round(len(res) / secs, 2) if secs else None,
            "generated": len(sids), "invalid_rate": invalid_rate(sids, table),
            "short_lists": int(sum(len(x) < k for x in res["rec_ad_ids"])),
        }
        m = all_metrics([list(x) for x in res["rec_ad_ids"]], targets, catalog, cfg.ks)
        m["invalid_rate"] = generation[name]["invalid_rate"]
        methods[name] = m
        rec_tables.append(pa.table({
            "method": [name] * len(res), "user_id": rows["user_id"].astype(str).tolist(),
            "target_ad_id": targets,
            "rec_ad_ids": pa.array([list(x) for x in res["rec_ad_ids"]], pa.list_(pa.string())),
            "rec_sids": pa.array([list(x) for x in res["rec_sids"]], pa.list_(pa.string())),
            "rec_scores": pa.array([list(map(float, x)) for x in res["rec_scores"]],
                                   pa.list_(pa.float32())),
        }))

    base_recs, base_info = run_baselines(cfg, rows, table, sids_dir, sequences, valid, k, timings)
    for name, recs in base_recs.items():
        methods[name] = all_metrics(recs, targets, catalog, cfg.ks)

    with timed(timings, "write"):
        metrics = {"split": cfg.split, "rows": len(rows), "ks": cfg.ks, "methods": methods,
                   "generation": generation, "baselines": base_info,
                   "train_sequences": len(sequences)}
        write_json(cfg.out, "metrics.json", metrics)
        table_md = report.markdown_table(methods, cfg.ks)
        write_text(cfg.out, "report.md",
                    f"# Offline evaluation ({cfg.split}, {len(rows)} rows, full ranking over "
                    f"{catalog.n_active} active ads)\n\n{table_md}\n")
        plots = report.plot(methods, cfg.ks, cfg.out) if methods else []
        if rec_tables:
            write_table(pa.concat_tables(rec_tables), cfg.out, "recommendations")
    summary = {"out": cfg.out, "split": cfg.split, "rows": len(rows),
               **{name: {c: round(m[c], 4) for c in (f"hr@{k}", f"ndcg@{k}", f"ecpm@{k}")
                         if c in m and not math.isnan(m[c])}
                  for name, m in methods.items()},
               "invalid_rate": {n: g["invalid_rate"] for n, g in generation.items()}}
    return write_manifest(
        cfg.out, STAGE,
        inputs={"prompts_dir": cfg.prompts_dir, "model_dirs": model_dirs, "sids_dir": sids_dir,
                "ingest_dir": ingest_dir},
        config=cfg, counts={"rows": len(rows), "methods": len(methods)}, timings=timings,
        extra={"sid_version": table.version, "plots": plots, "report": "report.md",
               "summary": summary})
