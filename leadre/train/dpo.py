"""Stage 5, ``leadre dpo``: Direct Preference Optimization after SFT, on the same Ray Train
wiring with TRL's ``DPOTrainer``. Same prompt; chosen = the ad of higher business value (eCPM),
rejected = one of lower value (LEADRE, section "DPO").

Where the policy starts and what the reference is (no second full model copy in any case):

* SFT trained a LoRA adapter (the default): the policy is ``<sft_dir>/model`` + the SFT adapter,
  trained further; TRL keeps a frozen copy of that adapter ("ref") next to it, so the reference
  is exactly the SFT model. The LoRA fields of this config are then inherited from the SFT
  adapter.
* SFT was a full fine-tune: the policy is ``<sft_dir>/merged`` + a fresh LoRA adapter; the
  reference is the same weights with the adapter disabled (= the SFT model).
* ``finetune=full``: every weight trains; TRL keeps a frozen copy as the reference (2x memory).

Reads ``<prompts_dir>/dpo/{train,valid,test}/part-*.parquet`` (``prompt``, ``chosen``, ``rejected``,
...). Besides TRL's ``rewards/*`` metrics on the validation split, the driver measures the
log-probability margin ``log p(chosen) - log p(rejected)`` of the SFT model and of the DPO model
on held-out pairs; the DPO implicit reward margin is ``beta`` times its change. Writes the same
layout as ``leadre sft`` (``model/`` is the model the DPO adapter applies to).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from leadre import artifacts
from leadre.artifacts import ArtifactError, check_sid_version
from leadre.model.factory import (ADAPTER_DIR, MERGED_DIR, MODEL_DIR, load_model, load_tokenizer,
                                  read_training_manifest, render_prompts, with_rendered_prompts)
from leadre.prompts.contract import read_manifest
from leadre.runtime import init_ray
from leadre.model import dense
from leadre.train.common import (lora_config, read_splits, summary, to_hf, train_and_export,
                                 tune_fusion)
from leadre.train.config import DpoConfig

log = logging.getLogger(__name__)
STAGE = "dpo"
COLUMNS = ["prompt", "chosen", "rejected"]


def build_trainer(cfg: DpoConfig, ctx: dict[str, Any], args: dict[str, Any], callbacks: list):
    """The per-worker ``DPOTrainer`` (called by :func:`leadre.train.common.train_loop`)."""
    from trl import DPOConfig, DPOTrainer

    model = load_model(ctx["model_dir"])
    tokenizer = load_tokenizer(ctx["model_dir"])
    peft_config = None
    if ctx["start_adapter"]:
        from peft import PeftModel

        # TRL copies this adapter into a frozen "ref" adapter: the reference is the SFT model.
        model = PeftModel.from_pretrained(model, ctx["start_adapter"], is_trainable=True)
    elif cfg.finetune == "lora":
        peft_config = lora_config(cfg, model)  # reference = adapter disabled = the SFT model
    train, valid = ctx["splits"]["train"], ctx["splits"].get("valid")
    dpo_args = DPOConfig(**args, beta=cfg.beta, loss_type=list(cfg.loss_type),
                         loss_weights=cfg.loss_weights)
    return DPOTrainer(model=model, ref_model=None, args=dpo_args, processing_class=tokenizer,
                      train_dataset=to_hf(with_rendered_prompts(train, tokenizer)),
                      eval_dataset=to_hf(with_rendered_prompts(valid, tokenizer)),
                      peft_config=peft_config, callbacks=callbacks)


def preference_margins(model, tokenizer, table, batch_size: int = 32) -> dict[str, float]:
    """Mean of ``log p(chosen | prompt) - log p(rejected | prompt)`` (completion tokens + EOS,
    summed) over the pairs of ``table``, and the share of pairs where it is positive."""
    import torch

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def encode(texts):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    prompts = encode(render_prompts(tokenizer, table.column("prompt").to_pylist()))
    sides = {s: encode(table.column(s).to_pylist()) for s in ("chosen", "rejected")}
    logps: dict[str, list[float]] = {"chosen": [], "rejected": []}
    model.eval()
    with torch.no_grad():
        for side, completions in sides.items():
            for i in range(0, len(prompts), batch_size):
                seqs = [(p, c + [eos]) for p, c in zip(prompts[i:i + batch_size],
                                                       completions[i:i + batch_size])]
                width = max(len(p) + len(c) for p, c in seqs)
                ids = torch.full((len(seqs), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                target = torch.zeros_like(ids, dtype=torch.bool)
                for row, (p, c) in enumerate(seqs):
                    ids[row, :len(p) + len(c)] = torch.tensor(p + c)
                    mask[row, :len(p) + len(c)] = 1
                    target[row, len(p):len(p) + len(c)] = True
                ids, mask, target = ids.to(device), mask.to(device), target.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                token_logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
                logps[side] += (token_logp * target[:, 1:]).sum(-1).tolist()
    diffs = [c - r for c, r in zip(logps["chosen"], logps["rejected"])]
    return {"pairs": len(diffs), "margin": sum(diffs) / max(len(diffs), 1),
            "accuracy": sum(d > 0 for d in diffs) / max(len(diffs), 1)}


def run(cfg: DpoConfig) -> dict[str, Any]:
    timings: dict[str, float] = {}
    with artifacts.timed(timings, "read"):
        sft_manifest = read_training_manifest(cfg.sft_dir, "sft")
        prompts_manifest = read_manifest(cfg.prompts_dir)
        # the pairs must name ads by the S-IDs the SFT model learnt
        check_sid_version(cfg.prompts_dir, prompts_manifest, sft_manifest.get("sid_version"),
                          f"the SFT model in {cfg.sft_dir}", sft_manifest.get("encoder_version"))
        splits = read_splits(cfg.prompts_dir, "dpo", COLUMNS, cfg, cfg.pair_types,
                             heldout=cfg.heldout_split)
        train, valid, heldout = splits["train"], splits["valid"], splits["heldout"]
        if train.num_rows == 0:
            raise ArtifactError(f"{cfg.prompts_dir}/dpo/train has no preference pairs"
                                + (f" of types {cfg.pair_types}" if cfg.pair_types else ""))
    init_ray(cfg.ray)  # after the checks: a mismatched input fails before Ray starts
    has_eval = valid is not None and valid.num_rows > 0
    sft, out = Path(cfg.sft_dir).resolve(), Path(cfg.out).resolve()
    sft_adapter = sft / ADAPTER_DIR
    from_adapter = cfg.finetune == "lora" and (sft_adapter / "adapter_config.json").exists()
    with artifacts.timed(timings, "model"):
        # <out>/model is what the DPO adapter applies to (kept for the evaluator and serving).
        source = sft / (MODEL_DIR if from_adapter else MERGED_DIR)
        if not (cfg.resume and (out / MODEL_DIR / "config.json").exists()):
            shutil.rmtree(out / MODEL_DIR, ignore_errors=True)
            shutil.copytree(source, out / MODEL_DIR)

    info = train_and_export(cfg, STAGE, build_trainer,
                            {"model_dir": str(out / MODEL_DIR), "has_eval": has_eval,
                             "splits": {"train": train, **({"valid": valid} if has_eval else {})},
                             "start_adapter": str(sft_adapter) if from_adapter else None},
                            adapter=cfg.finetune == "lora", timings=timings)
    history = info.pop("history")
    heldout_info: dict[str, Any] = {}
    if heldout is not None and heldout.num_rows:
        with artifacts.timed(timings, "heldout_margin"):
            before = preference_margins(load_model(sft / MERGED_DIR), load_tokenizer(sft / MERGED_DIR),
                                        heldout)
            after = preference_margins(load_model(out / MERGED_DIR),
                                       load_tokenizer(out / MERGED_DIR), heldout)
        heldout_info = {"split": cfg.heldout_split, "pairs": after["pairs"],
                        "logp_margin_before": round(before["margin"], 4),
                        "logp_margin_after": round(after["margin"], 4),
                        "accuracy_before": round(before["accuracy"], 4),
                        "accuracy_after": round(after["accuracy"], 4),
                        "reward_margin": round(cfg.beta * (after["margin"] - before["margin"]), 4)}
    info["heldout"] = heldout_info
    sft_dense = dense.find(sft)
    if sft_dense is not None:
        # DPO moves the states the SFT head reads, not the head: the same head, the fusion
        # weight tuned again on this model
        shutil.rmtree(out / dense.DENSE_DIR, ignore_errors=True)
        shutil.copytree(sft_dense, out / dense.DENSE_DIR)
        with artifacts.timed(timings, "fusion"):
            fusion = sft_manifest.get("config", {})
            info["fusion"] = tune_fusion(str(out), sft_manifest["inputs"]["sids_dir"],
                                         cfg.prompts_dir, fusion.get("fusion_rows", 512),
                                         cfg.seed, cfg.generation.batch_size,
                                         fusion.get("fusion_tolerance", 0.02))
    manifest = artifacts.write_manifest(
        cfg.out, STAGE,
        inputs={"prompts_dir": cfg.prompts_dir, "sft_dir": cfg.sft_dir, "sids_dir": sft_manifest["inputs"].get("sids_dir"),
                "start": "sft adapter" if from_adapter else "sft merged model"},
        config=cfg,
        counts={"train_pairs": train.num_rows, "valid_pairs": valid.num_rows if has_eval else 0,
                "heldout_pairs": heldout_info.get("pairs", 0)},
        timings=timings,
        extra={"sid_version": sft_manifest.get("sid_version"),
               "encoder_version": sft_manifest.get("encoder_version"), "training": info,
               "history": history,
               "prompt_config": (sft_manifest.get("prompt_config")
                                 or prompts_manifest.get("config"))})
    manifest["summary"] = {**summary(cfg, info, timings), "heldout": heldout_info}
    return manifest
