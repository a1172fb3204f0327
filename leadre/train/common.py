"""What ``leadre sft`` and ``leadre dpo`` share: the training knobs, reading stage-3 parquet, the
Ray Train wiring (``TorchTrainer`` -> one TRL trainer per worker); the export of the chosen
checkpoint is :mod:`leadre.train.export`.

How a run works::

    driver                                    each Ray Train worker (rank r of N)
    ------                                    -----------------------------------
    write <out>/model (base + S-ID tokens)
    TorchTrainer(train_loop).fit()  ───────>  read the prompts parquet (the HF sampler shards it)
      FailureConfig: restart the group        build the TRL trainer (stage's `build` function)
      on a worker failure, and hand           prepare_trainer(trainer)
      it the latest checkpoint  <──────────   trainer.train(resume_from_checkpoint=...)
                                              every save_steps: report the HF checkpoint (rank 0)
    pick the best checkpoint (eval_hr@10 or eval_loss)
    export adapter + merged model, manifest

A re-submitted run with ``resume=true`` continues from the checkpoints under ``<out>/ray``
(Ray Train restores the run's checkpoint state from its storage).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Literal

import pyarrow as pa

from leadre import artifacts
from leadre.config import ConfigError
from leadre.model.factory import RAY_DIR
from leadre.prompts import contract
from leadre.train.config import TrainArgs
from leadre.train.export import export

log = logging.getLogger(__name__)

# What a training stage writes for watching it, in its output directory.
PROGRESS_FILE, TENSORBOARD_DIR, CURVES_PNG = "progress.jsonl", "tensorboard", "curves.png"

# Nothing in a training job may reach for a hub (no internet here; reproducibility elsewhere).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


# --------------------------------------------------------------------------- data


def load_split(prompts: str, kind: Literal["sft", "dpo"], split: str, columns: list[str],
               *, tasks: list[str] | None = None, limit: int | None = None, seed: int = 0,
               required: bool = True) -> pa.Table | None:
    """``<prompts>/<kind>/<split>`` with ``columns``, rows with a null in them dropped
    (optionally only some ``tasks``: SFT tasks, or DPO pair types; and a seeded random subset
    of ``limit`` rows, the same subset on every worker)."""
    table = contract.read_split(prompts, kind, split, columns, labels=tasks, complete=True,
                                required=required)
    if table is not None and limit is not None and table.num_rows > limit:
        import numpy as np

        rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, limit, replace=False))
        table = table.take(pa.array(rows))
    return table


def read_splits(prompts: str, kind: Literal["sft", "dpo"], columns: list[str],
                cfg: TrainArgs, tasks: list[str] | None, heldout: str | None = None
                ) -> dict[str, pa.Table | None]:
    """The training splits of ``kind``, read once on the driver: ``train`` (required,
    ``max_train_samples``), ``valid`` and ``heldout`` when asked (optional,
    ``max_eval_samples``). The workers get them through the object store
    (:func:`train_and_export`), not from the files again."""
    limits = {"train": cfg.max_train_samples, "valid": cfg.max_eval_samples,
              "heldout": cfg.max_eval_samples}
    names = {"train": "train", "valid": "valid", **({"heldout": heldout} if heldout else {})}
    return {key: load_split(prompts, kind, split, columns, tasks=tasks, limit=limits[key],
                            seed=cfg.seed, required=key == "train")
            for key, split in names.items()}


def to_hf(table: pa.Table | None):
    """An in-memory ``datasets.Dataset`` (each worker holds the split; the HF distributed
    sampler gives each rank its share)."""
    if table is None or table.num_rows == 0:
        return None
    from datasets import Dataset

    return Dataset.from_dict(table.to_pydict())


# --------------------------------------------------------------------------- per-worker wiring


def hf_args(cfg: TrainArgs, output_dir: str, *, has_eval: bool, use_gpu: bool) -> dict[str, Any]:
    """``TrainingArguments`` fields shared by TRL's ``SFTConfig`` and ``DPOConfig``."""
    import torch

    bf16 = cfg.bf16
    if bf16 is None:
        bf16 = use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    eval_kw: dict[str, Any] = {"eval_strategy": "no"}
    if has_eval:
        key, higher = selection_key(cfg)
        eval_kw = {"eval_strategy": "steps", "eval_steps": cfg.save_steps,
                   "per_device_eval_batch_size": cfg.batch_size,
                   "metric_for_best_model": key, "greater_is_better": higher,
                   "load_best_model_at_end": cfg.early_stopping_patience is not None}
    return dict(
        output_dir=output_dir, seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        logging_strategy="steps", logging_steps=cfg.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        bf16=bool(bf16), fp16=False, use_cpu=not use_gpu,
        gradient_checkpointing=cfg.gradient_checkpointing,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False, max_length=cfg.max_length, **eval_kw)


def selection_key(cfg: TrainArgs) -> tuple[str, bool]:
    """(metric name as logged, higher is better) of ``cfg.selection_metric``."""
    return ("eval_loss", False) if cfg.selection_metric == "eval_loss" else \
        (f"eval_{cfg.selection_metric}", True)


def lora_config(cfg: TrainArgs, model) -> Any:
    """PEFT LoRA on ``cfg.lora_target_modules``; the input embeddings (and an untied LM head)
    are trained in full through ``modules_to_save``, so the new S-ID rows learn. With tied
    embeddings the trained copy stays tied (``ensure_weight_tying``). LoRA on the LM head is
    never used: TRL's fused LM-head loss rejects it."""
    from peft import LoraConfig

    from leadre.model.factory import embedding_module_names

    emb, head, tied = embedding_module_names(model)
    modules_to_save = [emb] + ([head] if head and not tied else [])
    targets = cfg.lora_target_modules
    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        modules_to_save=modules_to_save, ensure_weight_tying=tied, task_type="CAUSAL_LM")


# A stage's trainer factory: (cfg, context, TrainingArguments fields, callbacks) -> HF Trainer.
BuildFn = Callable[[Any, dict[str, Any], dict[str, Any], list], Any]


def score_labelled_positions_only() -> None:
    """Make TRL's fused LM head project only the positions that carry a label on CPU too.

    Both trainers replace the LM head with a chunked one that scores, on Triton devices, only
    positions whose label is not -100, and elsewhere every position, so that a graph compiler
    (Neuron) sees the same shapes on every batch. Eager CPU has no such compiler, and here the
    label is the S-ID completion (about 6 of 200 tokens): scoring the prompt's positions was a
    third of a CPU training step (measured with py-spy on the demo recipe). The loss, its
    gradient and the logged metrics are the same either way (unlabelled positions are zeros in
    both); ``test_fused_head_on_cpu_scores_labelled_positions_only`` checks it."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    if getattr(original, "leadre_cpu_compact", False):
        return

    def compact(device) -> bool:
        return device.type == "cpu" or original(device)

    compact.leadre_cpu_compact = True
    trl_utils._use_triton = compact


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker function of both stages."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    score_labelled_positions_only()
    import ray.train
    import torch
    from ray.train.huggingface.transformers import prepare_trainer
    from transformers import EarlyStoppingCallback, PrinterCallback

    from leadre.train import callbacks as train_callbacks

    cfg: TrainArgs = config["cfg"]
    ctx = dict(config["context"])
    # the driver's tables, from the object store (zero-copy on its node), not the files again
    ctx["splits"] = {k: ray.get(ref) for k, ref in ctx.get("splits", {}).items()}
    if not config["use_gpu"]:
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    checkpoint = ray.train.get_checkpoint()
    global_batch = cfg.batch_size * cfg.grad_accum * world
    with tempfile.TemporaryDirectory(prefix="leadre-train-") as work, \
            (checkpoint.as_directory() if checkpoint else nullcontext(None)) as ckpt_dir:
        resume = str(Path(ckpt_dir) / train_callbacks.HF_CHECKPOINT) if ckpt_dir else None
        callbacks = [train_callbacks.StepTimer(global_batch, rank),
                     train_callbacks.FaultInjector(cfg.fail_at_step, resumed=resume is not None,
                                                   rank=rank),
                     train_callbacks.ReportCallback(rank=rank, report_every=cfg.report_every)]
        if ctx["has_eval"] and ctx.get("selection_rows"):
            callbacks.append(train_callbacks.GenerationMetric(
                ctx["selection_rows"], ctx["sids_dir"], cfg.generation, rank=rank,
                world=world))
        if ctx["has_eval"] and cfg.early_stopping_patience is not None:
            callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience))
        callbacks.append(train_callbacks.CurveWriter(  # after the metrics it writes
            str(Path(cfg.out) / PROGRESS_FILE), str(Path(cfg.out) / TENSORBOARD_DIR), rank))
        args = hf_args(cfg, work, has_eval=ctx["has_eval"], use_gpu=config["use_gpu"])
        trainer = prepare_trainer(config["build"](cfg, ctx, args, callbacks))
        trainer.remove_callback(PrinterCallback)  # the metrics history is in the manifest
        if rank == 0:
            trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            log.info("training %s trainable parameters on %d worker(s), resume from %s",
                     f"{trainable:,}", world, resume)
        trainer.train(resume_from_checkpoint=resume)


# --------------------------------------------------------------------------- driver


def resolve_use_gpu(cfg: TrainArgs) -> bool:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.device == "gpu" and gpus < cfg.num_workers:
        raise ConfigError(f"device=gpu with {cfg.num_workers} workers, but the cluster has "
                          f"{gpus:g} GPU(s)")
    return cfg.device == "gpu" or (cfg.device == "auto" and gpus >= cfg.num_workers)


def fit(cfg: TrainArgs, name: str, build: BuildFn, context: dict[str, Any]):
    """Run ``build``'s trainer on a Ray Train worker group; returns the ``ray.train.Result``.
    ``context["splits"]`` (name -> table, as :func:`read_splits` returns them) reaches every
    worker through the object store; ``build`` finds them in ``ctx["splits"]``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = resolve_use_gpu(cfg)
    storage = Path(cfg.out).resolve() / RAY_DIR
    if not cfg.resume and (storage / name).exists():
        shutil.rmtree(storage / name)  # a fresh run must not resume a stale one
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    context = {**context, "splits": {k: ray.put(t) for k, t in context.get("splits", {}).items()
                                     if t is not None}}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "build": build, "context": context, "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute=selection_key(cfg)[0] if context["has_eval"] else None,
                checkpoint_score_order="max" if selection_key(cfg)[1] else "min")))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training reported no checkpoint (see the worker logs)")
    return result, use_gpu


def train_and_export(cfg: TrainArgs, stage: str, build: BuildFn, context: dict[str, Any], *,
                     adapter: bool, timings: dict[str, float]) -> dict[str, Any]:
    """Fit on Ray Train, then export the chosen checkpoint (see :func:`fit`, :func:`export`)."""
    if cfg.early_stopping_patience is not None and not context["has_eval"]:
        log.warning("early_stopping_patience is set but there is no validation split: "
                    "training runs to the end")
    out = Path(cfg.out)
    if not cfg.resume:  # a fresh run's curves start empty
        (out / PROGRESS_FILE).unlink(missing_ok=True)
        shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
    stop = threading.Event()
    watcher = threading.Thread(target=_log_progress, args=(stage, out / PROGRESS_FILE,
                                                           cfg.progress_every_s, stop),
                               daemon=True)
    watcher.start()
    try:
        with artifacts.timed(timings, "fit"):
            result, use_gpu = fit(cfg, stage, build, context)
    finally:
        stop.set()
        watcher.join()
    with artifacts.timed(timings, "export"):
        info = export(result, cfg.out, context["has_eval"], adapter, selection_key(cfg))
        plot_curves(info["history"], out / CURVES_PNG, stage)
    info.update(device="gpu" if use_gpu else "cpu", workers=cfg.num_workers,
                storage=str(Path(cfg.out).resolve() / RAY_DIR / stage))
    return info


def tune_fusion(out: str, sids_dir: str, prompts_dir: str, rows: int, seed: int,
                batch_size: int, tolerance: float = 0.02) -> dict[str, Any] | None:
    """Tune the exported model's beam/dense fusion weight on ``rows`` validation users (a
    seeded sample of ``eval/valid``) and record it in ``<out>/dense/head.json``; None for a
    model without a dense head. Decodes as eval and serving do by default (20 beams, 50
    dense candidates), so the weight fits the ranking it will weigh; ``tolerance``: see
    :func:`leadre.model.dense.tune_fusion`."""
    import numpy as np

    from leadre.model import dense
    from leadre.model.config import GenerationConfig
    from leadre.model.decode import SidGenerator

    where = dense.find(out)
    if where is None:
        return None
    valid = contract.read_split(prompts_dir, "eval", "valid", ["prompt", "target_ad_id"],
                                required=False)
    if valid is None or valid.num_rows == 0:
        log.warning("no eval/valid rows in %s: the dense head keeps fusion weight 0 (the beam "
                    "alone) until tuned", prompts_dir)
        return {"weight": 0.0, "rows": 0}
    pick = np.sort(np.random.default_rng(seed).permutation(valid.num_rows)[:rows])
    valid = valid.take(pick)
    gen = SidGenerator.from_stage_dir(out, sids_dir, GenerationConfig(top_k=10,
                                                                      batch_size=batch_size))
    # The validation period's catalog: ads the model never trained on (cold ones) arrive later
    unseen = gen.unseen if gen.unseen is not None else np.zeros(len(gen.table), bool)
    gen.set_active(gen.table.ad_id_array[unseen & gen.table.active].tolist(), False)
    beam_rows, beam_scores, users = gen.decode(valid.column("prompt").to_pylist())
    targets = gen.table.rows_of(valid.column("target_ad_id").to_pylist())
    # trained ads scored as if unseen: those the head never saw (or, not recorded, a tenth)
    held = dense.load_trained_ads(where, "dense_holdout")
    if held:
        pseudo = np.isin(gen.table.ad_id_array.astype(str), list(held)) & gen.table.active
    else:
        trained = np.flatnonzero(gen.table.active)
        pseudo = np.zeros(len(gen.table), bool)
        pseudo[np.random.default_rng(seed).choice(trained, int(round(0.1 * len(trained))),
                                                  replace=False)] = True
    dense_lp = gen.dense_log_probs(users)
    dense_rows = gen.dense_top(users, gen.cfg.dense_candidates, dense_lp)  # best first
    weight, calibration, curves = dense.tune_fusion(
        beam_rows, beam_scores, dense_rows, dense_lp, pseudo, targets, tolerance=tolerance)
    beam_only = dense.hits_at(beam_rows, targets)
    curve = curves["hr@10_by_weight"]
    tuned = {"rows": len(targets), "split": "valid", "beam_hr@10": beam_only, **curves,
             "tolerance": tolerance, "dense_only_hr@10": dense.hits_at(dense_rows, targets),
             "unseen_calibration": list(calibration), "pseudo_unseen_ads": int(pseudo.sum())}
    dense.set_fusion(where, weight, calibration, tuned)
    log.info("dense fusion: weight %g on %d validation users (HR@10 beam %.4f -> fused %.4f "
             "with %d ads scored as unseen; dense alone %.4f)", weight, len(targets),
             beam_only, curve[str(weight)], pseudo.sum(), tuned["dense_only_hr@10"])
    return {"weight": weight, **tuned}


def progress_line(stage: str, points: list[dict[str, Any]]) -> str | None:
    """``sft: step 600/3600 (17%), loss 1.94, eval_loss 1.71, eval_hr@10 0.074, ~12 min left``
    from the points of ``progress.jsonl`` so far (None before the first)."""
    if not points:
        return None
    last = points[-1]
    step, total = last["step"], last.get("max_steps") or 0
    parts = [f"{stage}: step {step}" + (f"/{total} ({step / total:.0%})" if total else "")]
    for key in ("loss", "eval_loss", "eval_hr@10"):
        value = next((p[key] for p in reversed(points) if key in p), None)
        if value is not None:
            parts.append(f"{key} {value:.4g}")
    first = points[0]
    if total and step > first["step"] and last["time"] > first["time"]:
        left = (total - step) * (last["time"] - first["time"]) / (step - first["step"])
        parts.append(f"~{left / 60:.0f} min left" if left >= 90 else f"~{left:.0f} s left")
    return ", ".join(parts)


def _log_progress(stage: str, path: Path, every_s: float, stop: threading.Event) -> None:
    """The driver's progress line, from what rank 0 writes to ``path``, every ``every_s``."""
    import json

    shown = None
    while not stop.wait(every_s):
        try:
            points = [json.loads(line) for line in path.read_text().splitlines() if line]
        except (OSError, ValueError):
            continue
        line = progress_line(stage, points)
        if line and line != shown:
            log.info("%s", line)
            shown = line


def plot_curves(history: list[dict[str, Any]], path: Path, stage: str) -> None:
    """Training loss, validation loss and (when logged) validation HR@10 against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    hits = [(e["step"], e["eval_hr@10"]) for e in history if "eval_hr@10" in e]
    if not train and not evals:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train loss"), (evals, "validation loss")):
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=label)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    lines, labels = ax.get_legend_handles_labels()
    if hits:
        ax2 = ax.twinx()
        ax2.plot(*zip(*hits), color="tab:green", marker="o", label="validation HR@10")
        ax2.set_ylabel("HR@10")
        more = ax2.get_legend_handles_labels()
        lines, labels = lines + more[0], labels + more[1]
    ax.legend(lines, labels, fontsize=8)
    ax.set_title(f"leadre {stage}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(cfg: TrainArgs, info: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """The few lines `leadre sft|dpo` prints."""
    loss = (f"{info['loss_start']:.4f} -> {info['loss_end']:.4f}"
            if info.get("loss_start") is not None else None)
    return {"out": cfg.out, "steps": info["exported"]["global_steps"],
            "exported_step": info["exported"]["step"], "train_loss": loss,
            "eval_loss_best": info.get("eval_loss_best"),
            **({"eval_hr@10_best": info["eval_hr@10_best"]}
               if info.get("eval_hr@10_best") is not None else {}),
            "samples_per_second": info.get("samples_per_second"),
            "workers": f"{info['workers']} x {info['device']}",
            "resumed_from_steps": info.get("resumed_from_steps"),
            "seconds": round(sum(timings.values()), 1)}
