"""Stage 4, ``leadre sft``: supervised fine-tuning of a causal LM to answer each intent-aware
prompt with the S-ID of the next ad (plus the auxiliary alignment tasks), on a Ray Train worker
group running TRL's ``SFTTrainer`` with a PEFT LoRA adapter.

Reads ``<prompts_dir>/sft/{train,valid}/part-*.parquet`` (columns ``prompt``, ``completion``, ``task``,
...) and the S-ID table of the ``leadre sids`` directory the prompts were built from. The loss
covers the completion tokens only (``completion_only_loss``); TRL appends EOS to each
completion. Writes (see :mod:`leadre.model.factory`)::

    <out>/model/    base model + S-ID tokens + tokenizer     <out>/adapter/  LoRA adapter
    <out>/merged/   merged model + tokenizer                 <out>/ray/sft/  Ray Train checkpoints
    <out>/manifest.json   inputs, config, counts, timings, metrics history, exported step
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from leadre import artifacts
from leadre.artifacts import ArtifactError, check_sid_version
from leadre.model import dense
from leadre.model.factory import (MODEL_DIR, load_model, load_tokenizer, prepare_base_model,
                                  with_rendered_prompts)
from leadre.prompts.contract import read_manifest, read_split
from leadre.runtime import init_ray
from leadre.train.common import (lora_config, read_splits, summary, to_hf, train_and_export,
                                 tune_fusion)
from leadre.train.config import SftConfig

log = logging.getLogger(__name__)
STAGE = "sft"
COLUMNS = ["prompt", "completion"]


def build_trainer(cfg: SftConfig, ctx: dict[str, Any], args: dict[str, Any], callbacks: list):
    """The per-worker ``SFTTrainer`` (called by :func:`leadre.train.common.train_loop`)."""
    from trl import SFTConfig, SFTTrainer

    model = load_model(ctx["model_dir"])
    tokenizer = load_tokenizer(ctx["model_dir"])
    train, valid = ctx["splits"]["train"], ctx["splits"].get("valid")
    kwargs = dict(
        model=model, processing_class=tokenizer,
        args=SFTConfig(**args, completion_only_loss=True, packing=False),
        train_dataset=to_hf(with_rendered_prompts(train, tokenizer)),
        eval_dataset=to_hf(with_rendered_prompts(valid, tokenizer)),
        peft_config=lora_config(cfg, model) if cfg.finetune == "lora" else None,
        callbacks=callbacks)
    if not ctx.get("dense"):
        return SFTTrainer(**kwargs)
    from leadre.model.dense import DenseHead, attach
    from leadre.train.dense_sft import DenseSFTTrainer

    meta = ctx["dense"]["meta"]
    head = DenseHead(meta["hidden_size"], meta["dim"], seed=cfg.seed,
                     temperature=meta["temperature"])
    attach(model, head)  # before PEFT wraps the model: a submodule, trained and synchronised
    return DenseSFTTrainer(**kwargs, head=head, dense_setup=ctx["dense"])


def dense_setup(cfg: SftConfig, table, sids_dir: str, model_dir: Path,
                encoder: str | None) -> dict[str, Any] | None:
    """What the workers need to train the dense head: the unit vectors and S-ID token ids of
    the ads it may answer (active, not held out as cold) and its meta; None when off."""
    if not cfg.dense_head:
        return None
    import json

    from leadre.model.dense import DenseMeta, soft_target_temperature
    from leadre.model.decode import table_vectors
    from leadre.sids.build import load_cold_ads

    if not artifacts.exists(artifacts.join(sids_dir, "embeddings")):
        log.warning("%s holds no ad vectors (S-IDs brought from elsewhere): training without "
                    "the dense head", sids_dir)
        return None
    vectors = table_vectors(table, sids_dir)
    cold = load_cold_ads(sids_dir)
    rows = [r for r in np.flatnonzero(table.active)
            if str(table.ad_id_array[r]) not in cold and vectors[r].any()]
    if not rows:
        raise ArtifactError(f"{sids_dir}: no active ad has a vector for the dense head to "
                            "learn from; set dense_head=false")
    # a share of the trained ads the head never sees: on valid they stand for the ads the
    # model will meet untrained (leadre.train.common.tune_fusion)
    held = np.random.default_rng(cfg.seed).permutation(len(rows))[
        :int(round(cfg.dense_holdout * len(rows)))]
    in_head = np.ones(len(rows), bool)
    in_head[held] = False
    head_rows = [r for r, keep in zip(rows, in_head) if keep]
    tokenizer = load_tokenizer(model_dir)
    token_ids = np.array([tokenizer.convert_tokens_to_ids(table.sid_tokens(table.ad_id_array[r]))
                          for r in head_rows], np.int64)
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    meta = DenseMeta(encoder_version=encoder, sid_version=table.version, hidden_size=hidden,
                     dim=int(vectors.shape[1]), temperature=cfg.dense_temperature)
    soft = soft_target_temperature(vectors[head_rows], cfg.dense_soft_targets, seed=cfg.seed)
    log.info("dense head: %d ads in its softmax (%d held out as stand-ins for unseen ads), "
             "soft-target temperature %.3f", len(head_rows), len(held), soft)
    return {"vectors": vectors[head_rows], "token_ids": token_ids,
            "meta": dataclasses.asdict(meta),
            "ad_ids": [str(table.ad_id_array[r]) for r in rows],
            "holdout_ads": [str(table.ad_id_array[rows[i]]) for i in held],
            "weight": cfg.dense_weight, "negatives": cfg.dense_negatives,
            "soft_targets": soft}


def _length_stats(tokenizer, tables, max_length: int) -> dict[str, Any]:
    """Token lengths of what TRL feeds the model: the rendered prompt followed by the
    completion and EOS, tokenized as one text (as TRL does), over every table given."""
    prompts: list[str] = []
    completions: list[str] = []
    for t in tables:
        if t is not None and t.num_rows:
            t = with_rendered_prompts(t, tokenizer)
            prompts += t.column("prompt").to_pylist()
            completions += t.column("completion").to_pylist()
    full = [p + c + tokenizer.eos_token for p, c in zip(prompts, completions)]
    total = np.array([len(ids) for ids in tokenizer(full)["input_ids"]])
    prompt = np.array([len(ids) for ids in tokenizer(prompts)["input_ids"]])
    pct = {f"p{q}": int(np.percentile(total, q, method="higher")) for q in (50, 90, 99)}
    return {"max_tokens": int(total.max()), "median_tokens": pct["p50"],
            "over_max_length": int((total > max_length).sum()),
            "distribution": {"examples": int(len(total)), "min": int(total.min()), **pct,
                             "max": int(total.max()), "mean": round(float(total.mean()), 1),
                             "prompt_max": int(prompt.max()),
                             "answer_max": int((total - prompt).max())}}


def _fit_max_length(cfg: SftConfig, lengths: dict[str, Any], model_dir: Path) -> dict[str, int]:
    """Raise ``cfg.max_length`` to the longest example when it is shorter: TRL cuts examples
    at their end, which is the answer. Refuses lengths past the model's context window."""
    configured, longest = cfg.max_length, lengths["max_tokens"]
    if longest > configured:
        import json

        window = json.loads((model_dir / "config.json").read_text()).get(
            "max_position_embeddings")
        if window and longest > window:
            raise ArtifactError(f"the longest example has {longest} tokens (prompt + answer + "
                                f"EOS), more than the model's {window}-token context: shorten "
                                "the prompts (leadre prompts max_events / max_prompt_tokens)")
        log.warning("max_length=%d would cut the answer of %d example(s); raising it to %d, "
                    "the longest example (prompt + S-ID + EOS)", configured,
                    lengths["over_max_length"], longest)
        cfg.max_length = longest
    return {"configured": configured, "used": cfg.max_length}


def _selection_rows(cfg: SftConfig) -> list[tuple[str, str]] | None:
    """(prompt, target ad id) of a seeded sample of the validation users for ``hr@10``; None
    (and the loss decides) when the metric is not hr@10 or the prompts have no such rows."""
    if cfg.selection_metric != "hr@10":
        return None
    rows = read_split(cfg.prompts_dir, "eval", "valid", ["prompt", "target_ad_id"],
                      required=False)
    if rows is None or rows.num_rows == 0:
        log.warning("no eval/valid rows in %s: checkpoints are chosen by eval_loss",
                    cfg.prompts_dir)
        cfg.selection_metric = "eval_loss"
        return None
    pick = np.random.default_rng(cfg.seed).permutation(rows.num_rows)[:cfg.selection_rows]
    rows = rows.take(np.sort(pick))
    return list(zip(rows.column("prompt").to_pylist(),
                    rows.column("target_ad_id").to_pylist()))


def run(cfg: SftConfig) -> dict[str, Any]:
    timings: dict[str, float] = {}
    with artifacts.timed(timings, "read"):
        from leadre.sids import load_table
        from leadre.sids.build import load_code_vectors
        from leadre.stages import resolve_inputs

        prompts_manifest = read_manifest(cfg.prompts_dir)
        sids_dir = resolve_inputs(STAGE, cfg).sids_dir
        table = load_table(sids_dir)
        encoder = artifacts.read_manifest(sids_dir, stage="sids").get("encoder_version")
        check_sid_version(cfg.prompts_dir, prompts_manifest, table.version, sids_dir, encoder)
        splits = read_splits(cfg.prompts_dir, "sft", COLUMNS, cfg, cfg.tasks)
        train, valid = splits["train"], splits["valid"]
        if train.num_rows == 0:
            raise ArtifactError(f"{cfg.prompts_dir}/sft/train has no examples"
                                + (f" of tasks {cfg.tasks}" if cfg.tasks else ""))
    init_ray(cfg.ray)  # after the checks: a mismatched input fails before Ray starts
    has_eval = valid is not None and valid.num_rows > 0
    out = Path(cfg.out).resolve()
    model_dir = out / MODEL_DIR
    with artifacts.timed(timings, "model"):
        if cfg.resume and (model_dir / "config.json").exists():
            model_info: dict[str, Any] = {"source": "reused from the run being resumed"}
        else:
            corpus = train.slice(0, cfg.tokenizer_corpus_rows)
            texts = corpus.column("prompt").to_pylist() + corpus.column("completion").to_pylist()
            vectors = load_code_vectors(sids_dir) if cfg.sid_init == "codebook" else None
            model_info = prepare_base_model(model_dir, sid_tokens=table.tokens(),
                                            base_model=cfg.base_model, preset=cfg.preset,
                                            corpus=texts, seed=cfg.seed, sid_vectors=vectors)
        lengths = _length_stats(load_tokenizer(model_dir), [train, valid], cfg.max_length)
    max_length = _fit_max_length(cfg, lengths, model_dir)
    distribution = lengths.pop("distribution")

    context = {"model_dir": str(model_dir), "has_eval": has_eval, "sids_dir": sids_dir,
               "splits": {"train": train, **({"valid": valid} if has_eval else {})},
               "selection_rows": _selection_rows(cfg) if has_eval else None,
               "dense": dense_setup(cfg, table, sids_dir, model_dir, encoder)}
    info = train_and_export(cfg, STAGE, build_trainer, context,
                            adapter=cfg.finetune == "lora", timings=timings)
    history = info.pop("history")
    head_dir = dense.find(out)
    if context["dense"] is not None and head_dir:
        dense.save_trained_ads(head_dir, context["dense"]["ad_ids"],
                               context["dense"]["holdout_ads"])
    with artifacts.timed(timings, "fusion"):
        info["fusion"] = tune_fusion(cfg.out, sids_dir, cfg.prompts_dir, cfg.fusion_rows,
                                     cfg.seed, cfg.generation.batch_size, cfg.fusion_tolerance)
    manifest = artifacts.write_manifest(
        cfg.out, STAGE,
        inputs={"prompts_dir": cfg.prompts_dir, "sids_dir": sids_dir,
                "base_model": cfg.base_model or f"preset:{cfg.preset}"},
        config=cfg,
        counts={"train_examples": train.num_rows,
                "valid_examples": valid.num_rows if has_eval else 0,
                "sid_tokens": len(table.tokens()), **lengths},
        timings=timings,
        extra={"sid_version": table.version, "encoder_version": encoder, "model": model_info,
               "training": info,
               "token_lengths": {**distribution, "max_length": max_length},
               "history": history, "prompt_config": prompts_manifest.get("config")})
    manifest["summary"] = summary(cfg, info, timings)
    return manifest
