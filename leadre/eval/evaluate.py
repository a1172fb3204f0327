"""Stage 6, ``leadre eval``: constrained generation for every eval user, metrics, baselines on
the same split, and a report (JSON + Markdown + PNG plots).

Reads:
    ``<prompts_dir>/eval/<split>``  user_id, prompt, target_ad_id, sequence_ad_ids (all splits)
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
pool, each actor holding one copy of the model (``generation.num_replicas``, ``num_gpus``).

Fairness rules (every report states them):

* Rows: one per user of the split, in user-id order; ``max_rows`` keeps the users with the
  smallest stable hash of (seed, user id), so every prompt directory (ablation variant) and
  every baseline of one world is scored on the same users. The user set's count and hash
  (sha256 of the sorted ids) are in ``metrics.json`` and the manifest summary.
* Baselines train on each user's full ad sequence before its first evaluation target (see
  :func:`train_sequences`) and rank from the row's full ``sequence_ad_ids``; the LLM sees the
  prompt's window. SASRec early-stops on the ``valid`` rows when scoring ``test``; when
  scoring ``valid`` it early-stops on the last item of each training sequence instead (held
  out of its training), never on the rows it is scored on.
* ``filter_history``: every method drops the row's ``sequence_ad_ids`` from its ranking
  before the cut to K (off by default: repeat engagements count as hits).
* Every HR/NDCG has a 95% bootstrap interval over users (``hr@10_ci: [lo, hi]``).

Every method ranks only active ads, like the trie.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from leadre.artifacts import (ArtifactError, check_model, check_sid_version, exists, join,
                              read_manifest, read_table, timed, write_json, write_manifest,
                              write_table, write_text)
from leadre.eval import report
from leadre.eval.channel import channel_report, history_groups
from leadre.eval.cold import add_cold_warm
from leadre.eval.rows import (early_stopping_slice, kept_after_history, load_eval_rows,
                              sample_users, train_sequences, user_set_hash)
from leadre.config import ConfigError
from leadre.eval.config import EvalConfig
from leadre.model import dense
from leadre.model.config import GenerationConfig

log = logging.getLogger(__name__)
STAGE = "eval"


# --- inputs -------------------------------------------------------------------------------

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

        from leadre.model.decode import SidGenerator

        cpus = _ray_actor_cpus()
        if cpus is not None:  # Ray caps actor threads at their CPU share: use that share
            torch.set_num_threads(max(1, int(round(cpus))))
        self.gen = SidGenerator.from_stage_dir(model_dir, sids_dir, GenerationConfig(**gen_cfg))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        gen = self.gen
        rows, scores, users = gen.decode(batch["prompt"].tolist())
        k = gen.cfg.top_k
        lists = {"rec": gen.candidates(*gen.rank(rows, scores, users, k))}
        if gen.fused:  # the beam alone too, from the same pass
            lists["beam"] = gen.candidates(rows[:, :k], scores[:, :k])
        out = {"row": batch["row"].to_numpy()}
        for prefix, cands in lists.items():
            out[f"{prefix}_ad_ids"] = [[c.ad_id for c in cs] for cs in cands]
            out[f"{prefix}_sids"] = [[c.sid for c in cs] for cs in cands]
            out[f"{prefix}_scores"] = [[c.score for c in cs] for cs in cands]
        return pd.DataFrame(out)


def generate_all(cfg: EvalConfig, model_dir: str, sids_dir: str, prompts: list[str]
                 ) -> pd.DataFrame:
    """Top-K for every prompt (columns row, rec_ad_ids, rec_sids, rec_scores), input order."""
    gen_cfg = dataclasses.asdict(cfg.generation)
    frame = pd.DataFrame({"row": np.arange(len(prompts)), "prompt": prompts})
    if cfg.generate_on == "local":
        res = GenerateBatch(model_dir, sids_dir, gen_cfg)(frame)
    else:
        import ray

        from leadre.runtime import init_ray

        init_ray(cfg.ray)
        # Sort by prompt length so each batch pads little; blocks keep actors busy. The blocks
        # are cut here, not by Dataset.repartition: its split tasks need a CPU, and when the
        # actor pool holds every CPU of the cluster (ray.num_cpus=1) they never run.
        frame = frame.iloc[np.argsort(frame["prompt"].str.len().to_numpy(), kind="stable")]
        gen = cfg.generation
        n_blocks = max(1, min(len(frame) // gen.batch_size, gen.num_replicas * 4))
        cuts = np.linspace(0, len(frame), n_blocks + 1).astype(int)
        ds = ray.data.from_pandas([frame.iloc[a:b] for a, b in zip(cuts[:-1], cuts[1:])])
        res = ds.map_batches(
            GenerateBatch, fn_constructor_kwargs={"model_dir": model_dir, "sids_dir": sids_dir,
                                                  "gen_cfg": gen_cfg},
            batch_size=gen.batch_size * 4, batch_format="pandas", concurrency=gen.num_replicas,
            num_cpus=gen.num_cpus, num_gpus=gen.gpus() or None).to_pandas()
    return res.sort_values("row").reset_index(drop=True)


# --- baselines ----------------------------------------------------------------------------

def run_baselines(cfg: EvalConfig, rows: pd.DataFrame, table, sids_dir: str,
                  sequences: dict[str, list[str]], valid: pd.DataFrame | None, k: int,
                  timings: dict[str, float]) -> tuple[dict[str, list[list[str]]], dict[str, Any]]:
    """Each of ``cfg.baselines`` built by its :data:`leadre.eval.baselines.BASELINES` factory,
    then asked for the top ``k`` of every eval row, ranking from the row's full sequence.
    Returns the rankings and the facts to report (per baseline, and ``early_stopping``)."""
    import torch

    from leadre.eval.baselines import BASELINES, BaselineInputs, SasrecConfig

    fit, stop, stop_info = early_stopping_slice(cfg.split, sequences, valid, cfg.seed)
    inputs = BaselineInputs(
        item_ids=[str(a) for a in table.ad_id_array],
        active_ids=[str(a) for a in table.ad_id_array[table.active]],
        sequences=list(sequences.values()), fit_sequences=fit, sids_dir=sids_dir,
        seed=cfg.seed, valid=stop,
        device="cuda" if torch.cuda.is_available() and cfg.generation.device != "cpu" else "cpu",
        sasrec=SasrecConfig(**{**cfg.sasrec, "seed": cfg.seed}), sasrec_grid=cfg.sasrec_grid)
    histories = rows["sequence_ad_ids"].tolist()
    # With filtering, ask for enough extra ads that k remain once the history is dropped.
    ask = k + (max((len(set(h)) for h in histories), default=0) if cfg.filter_history else 0)
    recs: dict[str, list[list[str]]] = {}
    early_stopped = {"sasrec", "text_sasrec"} & set(cfg.baselines)
    info: dict[str, Any] = {"early_stopping": stop_info} if early_stopped else {}
    for name in cfg.baselines:
        with timed(timings, f"baseline_{name}"):
            model, facts = BASELINES[name](inputs)
            if facts:
                info[name] = facts
            if model is not None:
                ranked = model.recommend(histories, ask)
                if cfg.filter_history:
                    ranked = [[r[j] for j in keep] for r, keep
                              in zip(ranked, kept_after_history(ranked, histories, k))]
                recs[name] = ranked
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
    from leadre.model.decode import invalid_rate
    from leadre.eval.metrics import CI_LEVEL, all_metrics, difference_ci
    from leadre.sids.build import load_table

    from leadre.stages import resolve_inputs

    timings: dict[str, float] = {}
    pm = read_manifest(cfg.prompts_dir, stage="prompts")
    resolve_inputs(STAGE, cfg)
    sids_dir, ingest_dir = cfg.sids_dir, cfg.ingest_dir
    with timed(timings, "read"):
        table = load_table(sids_dir)
        check_sid_version(cfg.prompts_dir, pm, table.version, sids_dir,
                          read_manifest(sids_dir).get("encoder_version"))
        for model_dir in [cfg.model_dir, *cfg.compare_dirs]:
            if model_dir:  # before any generation actor loads it
                check_model(model_dir, table.version, sids_dir)
        if cfg.channel_k and cfg.model_dir and cfg.channel_k > cfg.generation.beam_size \
                and not (cfg.generation.ranking == "fused" and dense.find(cfg.model_dir)):
            raise ConfigError(f"eval: channel_k={cfg.channel_k} > generation.beam_size="
                              f"{cfg.generation.beam_size} and {cfg.model_dir} has no dense "
                              "head to fill its list: raise generation.beam_size")
        if ingest_dir:
            read_manifest(ingest_dir, stage="ingest")
        rows = load_eval_rows(cfg.prompts_dir, cfg.split)
        rows = rows[sample_users(rows["user_id"], cfg.max_rows, cfg.seed)].reset_index(drop=True)
        sequences, valid = train_sequences(cfg.prompts_dir)
        popularity: dict[str, int] = {}
        for s in sequences.values():
            for a in s:
                popularity[a] = popularity.get(a, 0) + 1
        catalog = load_catalog_stats(ingest_dir, table, popularity)
    targets = rows["target_ad_id"].astype(str).tolist()
    users = rows["user_id"].tolist()
    users_info = {"users": len(set(users)), "users_hash": user_set_hash(users)}
    histories = rows["sequence_ad_ids"].tolist()
    k = max(cfg.ks)
    ranked: dict[str, list[list[str]]] = {}
    log.info("eval: %d %s rows (%d users, %s), %d active ads", len(rows), cfg.split,
             users_info["users"], users_info["users_hash"], int(table.active.sum()))

    def score(recs: list[list[str]]) -> dict[str, Any]:
        return all_metrics(recs, targets, catalog, cfg.ks, users=users,
                           ci_resamples=cfg.ci_resamples, seed=cfg.seed)

    methods: dict[str, dict[str, Any]] = {}
    generation: dict[str, Any] = {}
    rec_tables = []
    model_dirs = [d for d in [cfg.model_dir, *cfg.compare_dirs] if d]
    for model_dir in model_dirs:
        base_name = method_name(model_dir, set(methods))
        t0 = time.perf_counter()
        res = generate_all(cfg, model_dir, sids_dir, rows["prompt"].tolist())
        secs = time.perf_counter() - t0
        timings[f"generate_{base_name}"] = secs
        # a model with a dense head: its fused ranking under its name, the beam alone beside
        rankings = {base_name: "rec"}
        if "beam_ad_ids" in res:
            rankings[f"{base_name}-beam"] = "beam"
        for name, prefix in rankings.items():
            cols = {c: [list(x) for x in res[f"{prefix}_{c}"]]
                    for c in ("ad_ids", "sids", "scores")}
            sids = [s for lst in cols["sids"] for s in lst]
            if cfg.filter_history:
                keep = kept_after_history(cols["ad_ids"], histories, k)
                cols = {c: [[x[j] for j in kp] for x, kp in zip(v, keep)]
                        for c, v in cols.items()}
            generation[name] = {
                "model_dir": model_dir, "ranking": "fused" if prefix == "rec" and
                len(rankings) > 1 else "beam", "rows": len(res), "seconds": round(secs, 3),
                "rows_per_s": round(len(res) / secs, 2) if secs else None,
                "generated": len(sids), "invalid_rate": invalid_rate(sids, table),
                "short_lists": int(sum(len(x) < k for x in cols["ad_ids"])),
            }
            ranked[name] = cols["ad_ids"]
            m = score([r[:k] for r in cols["ad_ids"]])
            m["invalid_rate"] = generation[name]["invalid_rate"]
            methods[name] = m
            rec_tables.append(pa.table({
                "method": [name] * len(res), "user_id": users, "target_ad_id": targets,
                "rec_ad_ids": pa.array(cols["ad_ids"], pa.list_(pa.string())),
                "rec_sids": pa.array(cols["sids"], pa.list_(pa.string())),
                "rec_scores": pa.array([list(map(float, x)) for x in cols["scores"]],
                                       pa.list_(pa.float32())),
            }))

    base_recs, base_info = run_baselines(cfg, rows, table, sids_dir, sequences, valid,
                                         max(k, 2 * (cfg.channel_k or 0)), timings)
    early_stopping = base_info.pop("early_stopping", None)
    for name, recs in base_recs.items():
        ranked[name] = recs
        methods[name] = score([r[:k] for r in recs])
    for name, recs in ranked.items():
        if cfg.history_groups:
            methods[name]["groups"] = history_groups(recs, targets, histories,
                                                     cfg.history_groups)
    # the cold-start split (when the S-IDs were built with one): cold and warm targets apart
    add_cold_warm(methods, ranked, targets, sids_dir, cfg.ks)
    # LEADRE (the first model) against each sequential baseline, as a paired difference
    differences = {}
    if model_dirs and cfg.ci_resamples:
        ours = method_name(model_dirs[0], set())
        for base in ("sasrec", "text_sasrec"):
            if base in ranked:
                differences[f"{ours} - {base}"] = difference_ci(
                    [r[:k] for r in ranked[ours]], [r[:k] for r in ranked[base]], targets,
                    users, k, cfg.ci_resamples, cfg.seed)
    channel = None
    if cfg.channel_k and model_dirs and "sasrec" in ranked:
        channel = channel_report(ranked[method_name(model_dirs[0], set())], ranked["sasrec"],
                                 targets, catalog, cfg.channel_k, users, cfg.ci_resamples,
                                 cfg.seed)

    fairness = {"split": cfg.split, **users_info, "max_rows": cfg.max_rows,
                "filter_history": cfg.filter_history,
                "ci": {"level": CI_LEVEL, "method": "percentile bootstrap over users",
                       "resamples": cfg.ci_resamples, "seed": cfg.seed}
                if cfg.ci_resamples else None}
    with timed(timings, "write"):
        metrics = {**fairness, "rows": len(rows), "ks": cfg.ks, "methods": methods,
                   "differences": differences,
                   "generation": generation, "baselines": base_info,
                   "early_stopping": early_stopping, "train_sequences": len(sequences),
                   "channel": channel}
        write_json(cfg.out, "metrics.json", metrics)
        write_text(cfg.out, "report.md", report.markdown_report(
            metrics, cfg.ks, n_active=catalog.n_active))
        plots = report.plot(methods, cfg.ks, cfg.out) if methods else []
        if rec_tables:
            write_table(pa.concat_tables(rec_tables), cfg.out, "recommendations")
    summary = {"out": cfg.out, **fairness, "rows": len(rows),
               **{name: {c: _rounded(m[c]) for c in (f"hr@{k}", f"hr@{k}_ci", f"ndcg@{k}",
                                                     f"ndcg@{k}_ci", f"ecpm@{k}")
                         if c in m and not _isnan(m[c])}
                  for name, m in methods.items()},
               "invalid_rate": {n: g["invalid_rate"] for n, g in generation.items()}}
    return write_manifest(
        cfg.out, STAGE,
        inputs={"prompts_dir": cfg.prompts_dir, "model_dirs": model_dirs, "sids_dir": sids_dir,
                "ingest_dir": ingest_dir},
        config=cfg, counts={"rows": len(rows), "users": users_info["users"],
                            "methods": len(methods)}, timings=timings,
        extra={"sid_version": table.version, "plots": plots, "report": "report.md",
               "summary": summary})


def _rounded(v: Any) -> Any:
    return [round(x, 4) for x in v] if isinstance(v, list) else round(v, 4)


def _isnan(v: Any) -> bool:
    return any(map(_isnan, v)) if isinstance(v, list) else math.isnan(v)
