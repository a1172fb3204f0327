"""Hugging Face ``TrainerCallback``s that run inside Ray Train workers (imported there only:
transformers and Ray Train are slow to import).

* :class:`StepTimer` adds throughput (``samples_per_second``, time inside optimiser steps only,
  so evaluation and checkpointing don't dilute it) to each training log entry, and prints one
  progress line per logging window on rank 0 (HF's own printer is removed).
* :class:`ReportCallback` reports each saved HF checkpoint to Ray Train (rank 0 uploads it, the
  other ranks report the same metrics without one) and, optionally, metrics every N steps.
* :class:`GenerationMetric` adds ``eval_hr@K`` to each evaluation: the validation users'
  next ads decoded with the trie-constrained beam search, so checkpoint choice and early
  stopping follow retrieval quality rather than the token loss (the loss keeps falling on
  popular ads while HR@10 stalls).
* :class:`FaultInjector` makes rank 0 raise at a given step of a run that did not start from a
  checkpoint: the test of "a killed run resumes from its last checkpoint".

Log entries live in ``TrainerState.log_history``, which the HF checkpoint stores in
``trainer_state.json`` and restores on resume, so the metrics history survives restarts.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray.train
from ray.train.huggingface.transformers import RayTrainReportCallback
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from leadre.model.config import GenerationConfig

HF_CHECKPOINT = RayTrainReportCallback.CHECKPOINT_NAME  # "checkpoint/" inside a Ray checkpoint


class InjectedFault(RuntimeError):
    """Raised by :class:`FaultInjector` (a simulated worker crash)."""


class StepTimer(TrainerCallback):
    """Samples per second over each logging window, from the time spent inside steps."""

    def __init__(self, global_batch: int, rank: int = 0):
        self.global_batch = global_batch
        self.rank = rank
        self.t0: float | None = None
        self.busy = 0.0
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.t0 is not None:
            self.busy += time.perf_counter() - self.t0
            self.steps += 1
            self.t0 = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Trainer.log appended this entry to log_history just before calling on_log.
        entry = state.log_history[-1] if state.log_history else None
        if entry is None or "loss" not in entry or not self.steps or self.busy <= 0:
            return
        entry["samples_per_second"] = round(self.steps * self.global_batch / self.busy, 3)
        entry["seconds_per_step"] = round(self.busy / self.steps, 4)
        self.busy, self.steps = 0.0, 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: mark where, for the manifest and the tests
            state.log_history.append({"step": state.global_step,
                                      "resumed_from_step": state.global_step})


class GenerationMetric(TrainerCallback):
    """``eval_hr@{k}`` on validation rows (prompt, target ad id), added to the metrics of
    every evaluation before the early-stopping and best-model logic read them.

    Each rank decodes its own slice of the rows and the hit counts are summed over the worker
    group, so every rank sees the same value (ranks that disagreed on stopping would hang).
    The decoder is the model layer's (``leadre.model.decode``), imported here only, in the
    workers; ``generation.top_k`` is the K of the metric."""

    def __init__(self, rows: list[tuple[str, str]], sids_dir: str,
                 generation: GenerationConfig, *, rank: int, world: int):
        self.rows = rows[rank::world]
        self.n_total = len(rows)
        self.sids_dir = sids_dir
        # the trainer's model is decoded where it lives, its adapter unmerged
        self.generation = replace(generation, merge_adapter=False)
        self.key = f"eval_hr@{generation.top_k}"
        self.table = None

    def on_evaluate(self, args, state, control, model=None, processing_class=None,
                    metrics=None, **kwargs):
        import torch
        import torch.distributed as dist

        from leadre.model.decode import SidGenerator
        from leadre.sids import load_table

        if self.table is None:
            self.table = load_table(self.sids_dir)
        tokenizer = processing_class if processing_class is not None else kwargs.get("tokenizer")
        was_training = model.training
        model.eval()
        gen = SidGenerator(model, tokenizer, self.table, replace(
            self.generation, device=next(model.parameters()).device.type))
        hits = 0
        if self.rows:
            out = gen.generate([p for p, _ in self.rows])
            hits = sum(t in {c.ad_id for c in cands} for (_, t), cands in zip(self.rows, out))
        if was_training:
            model.train()
        counts = torch.tensor([hits, len(self.rows)], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        value = float(counts[0] / max(counts[1], 1))
        if metrics is not None:
            metrics[self.key] = value
        # Trainer.evaluate logged its metrics before calling us: add ours to that entry so
        # the history (and what is reported to Ray Train with a checkpoint) holds it.
        if state.log_history and "eval_loss" in state.log_history[-1]:
            state.log_history[-1][self.key] = round(value, 6)


class CurveWriter(TrainerCallback):
    """Rank 0 writes each logged point as it happens, for watching a run: a line of JSON in
    ``progress`` (which the driver turns into a progress line) and the same scalars as
    TensorBoard events in ``tensorboard_dir``. Evaluation points are written from
    ``on_evaluate``, after :class:`GenerationMetric` (placed before this callback) has added
    ``eval_hr@10`` to them."""

    def __init__(self, progress: str, tensorboard_dir: str, rank: int):
        self.on = rank == 0
        self.path, self.tb_dir = Path(progress), Path(tensorboard_dir)
        self.writer = None

    def _write(self, state, values: dict) -> None:
        import json

        point = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if not self.on or not point:
            return
        if self.writer is None:
            from tensorboardX import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.tb_dir))
        record = {"step": state.global_step, "max_steps": state.max_steps,
                  "time": time.time(), **point}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in point.items():
            tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, value, state.global_step)
        self.writer.flush()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._write(state, logs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._write(state, {k: v for k, v in (metrics or {}).items()
                            if k in ("eval_loss", "eval_hr@10")})

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()


class FaultInjector(TrainerCallback):
    def __init__(self, fail_at_step: int | None, *, resumed: bool, rank: int):
        self.fail_at_step = fail_at_step
        self.armed = fail_at_step is not None and not resumed and rank == 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.armed and state.global_step >= self.fail_at_step:
            raise InjectedFault(f"fault injected at step {state.global_step} (fail_at_step)")


class ReportCallback(RayTrainReportCallback):
    """``RayTrainReportCallback`` with one upload per checkpoint (rank 0's) instead of one per
    worker, plus optional metric-only reports every ``report_every`` steps."""

    def __init__(self, rank: int, report_every: int = 0):
        super().__init__()
        self.rank = rank
        self.report_every = report_every
        self.last_saved_step = -1

    @staticmethod
    def _metrics(state) -> dict:
        metrics: dict = {}
        for entry in state.log_history:
            metrics.update(entry)
        metrics["step"] = state.global_step
        return metrics

    def on_save(self, args, state, control, **kwargs):
        self.last_saved_step = state.global_step
        metrics = self._metrics(state)
        if self.rank != 0:
            ray.train.report(metrics=metrics, checkpoint=None)
            return
        source = get_last_checkpoint(args.output_dir)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if source is not None:
                shutil.copytree(source, Path(tmp, HF_CHECKPOINT))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics=metrics, checkpoint=checkpoint)

    def on_step_end(self, args, state, control, **kwargs):
        if (self.report_every and state.global_step % self.report_every == 0
                and not control.should_save):
            ray.train.report(metrics=self._metrics(state))
