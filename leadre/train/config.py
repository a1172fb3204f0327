"""The configurations of the training stages: ``TrainArgs`` (what SFT and DPO share),
``SftConfig`` (stage 4, ``leadre sft``), ``DpoConfig`` (stage 5, ``leadre dpo``) and
``BaseModelConfig`` (``leadre base-model``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from leadre.config import ConfigError
from leadre.model.config import GenerationConfig
from leadre.model.factory import PresetName
from leadre.prompts.contract import PAIR_TYPES, TASKS
from leadre.runtime import RayConfig
from leadre.train.base_models import BASE_MODELS

LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                   "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                   "sigmoid_norm"]


@dataclass
class TrainArgs:
    """Knobs shared by ``SftConfig`` and ``DpoConfig`` (see those for the stage-specific ones).

    Parameters:
        num_workers / cpus_per_worker / device: the Ray Train worker group. ``device=auto``
            trains on GPUs when the cluster has them (one per worker, bf16 when supported).
        finetune: ``lora`` (PEFT LoRA on the linear layers; the token embeddings and the LM
            head are trained in full, since the S-ID rows are new) or ``full``.
        batch_size / grad_accum: per-worker micro-batch and gradient accumulation; one
            optimiser step sees ``batch_size * grad_accum * num_workers`` examples.
        epochs / max_steps: ``max_steps`` > 0 overrides ``epochs``.
        logging_steps: a point of the metrics history (loss, learning rate, samples/s) every N
            optimiser steps. ``report_every``: also send metrics to Ray Train every N steps
            (each report costs ~2 s on a small machine; 0 = only with checkpoints). Every point
            also lands in ``<out>/progress.jsonl`` and ``<out>/tensorboard`` as it is logged
            (``tensorboard --logdir <out>/tensorboard``), and ``<out>/curves.png`` plots the
            history at the end. ``progress_every_s``: the driver logs a progress line (step,
            loss, validation metrics, time left) at most this often.
        save_steps: a checkpoint (and, with validation data, an evaluation) every N steps; the
            last step is always saved. ``keep_checkpoints``: how many Ray Train keeps.
        early_stopping_patience: stop after this many evaluations without a better
            selection metric (``None`` = never); the best checkpoint is exported either way.
        selection_metric: what "better" means for checkpoint choice and early stopping:
            ``eval_loss`` (lower), or ``hr@10`` (higher; SFT only: the validation users' next
            ads decoded with the trie-constrained beam search, ``selection_rows`` of them).
        generation: how the hr@10 selection metric decodes
            (:class:`~leadre.model.config.GenerationConfig`; default 10 beams, top 10). Its
            pool fields are unused: each Ray Train worker decodes its own slice.
        max_failures / resume: Ray Train restarts a failed worker group this many times
            from the last checkpoint; ``resume=true`` continues a previous run from ``<out>/ray``.
        fail_at_step: fault injection for tests: rank 0 raises at this step of a run that did
            not start from a checkpoint.
    """

    out: str = field(default="runs/train", metadata={
        "help": "output directory (local or mounted path: model/, adapter/, merged/, ray/)"})
    prompts_dir: str = field(default="runs/prompts", metadata={
        "help": "output directory of `leadre prompts` (sharded parquet, local path or URI)"})
    # --- Ray Train worker group
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers (data parallel)"})
    cpus_per_worker: float = field(default=1.0, metadata={
        "help": "CPUs reserved per worker; torch uses max(1, int(this)) threads on CPU"})
    device: Literal["auto", "cpu", "gpu"] = field(default="auto", metadata={
        "help": "auto: one GPU per worker when the cluster has GPUs, else CPU (gloo)"})
    bf16: bool | None = field(default=None, metadata={
        "help": "bf16 mixed precision; default: on when every worker's GPU supports it"})
    # --- adapter
    finetune: Literal["lora", "full"] = field(default="lora", metadata={
        "help": "lora: PEFT LoRA + trainable embeddings/LM head; full: train every weight"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={
        "help": "modules that get LoRA (names or ['all-linear']; the LM head never does)"})
    # --- optimisation
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate (AdamW)"})
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = field(
        default="cosine", metadata={"help": "learning-rate schedule"})
    warmup_ratio: float = field(default=0.03, metadata={
        "help": "fraction of the steps spent warming the learning rate up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=8, metadata={"help": "examples per worker per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training split"})
    max_steps: int = field(default=-1, metadata={
        "help": "optimiser steps to run; > 0 overrides epochs"})
    max_length: int = field(default=512, metadata={
        "help": "tokens per example (prompt + response); longer examples are cut at the end"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass (less memory, about 20 percent slower)"})
    seed: int = field(default=0, metadata={"help": "seed for init, sampling and shuffling"})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "train on a seeded random subset of this many examples (time budgets)"})
    max_eval_samples: int | None = field(default=512, metadata={
        "help": "evaluate on at most this many validation examples (None = all)"})
    # --- metrics, checkpoints, fault tolerance
    logging_steps: int = field(default=10, metadata={
        "help": "optimiser steps between metrics-history points"})
    report_every: int = field(default=0, metadata={
        "help": "also report metrics to Ray Train every N steps (0 = only with checkpoints)"})
    progress_every_s: float = field(default=120.0, metadata={
        "help": "seconds between the progress lines (step, loss, time left) of a run"})
    save_steps: int = field(default=200, metadata={
        "help": "optimiser steps between checkpoints (and validation runs)"})
    keep_checkpoints: int | None = field(default=3, metadata={
        "help": "checkpoints Ray Train keeps (best by validation loss + the latest)"})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "stop after N evaluations without a better selection metric (None = off)"})
    selection_metric: Literal["eval_loss", "hr@10"] = field(default="eval_loss", metadata={
        "help": "checkpoint choice and early stopping: eval_loss (lower) or hr@10 (higher)"})
    selection_rows: int = field(default=256, metadata={
        "help": "hr@10: validation users decoded at each evaluation"})
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(beam_size=10, top_k=10, batch_size=16),
        metadata={"help": "hr@10: decoding at each evaluation (beam_size, batch_size, ...)"})
    max_failures: int = field(default=2, metadata={
        "help": "worker-group restarts from the last checkpoint before the run fails"})
    resume: bool = field(default=False, metadata={
        "help": "continue a previous run from the checkpoints under <out>/ray"})
    fail_at_step: int | None = field(default=None, metadata={
        "help": "testing: rank 0 raises at this step unless the run started from a checkpoint"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={
        "help": "Ray connection (address, num_cpus, object_store_mb)"})

    def __post_init__(self) -> None:
        if "://" in self.out:
            raise ConfigError(f"out={self.out}: model directories are written with "
                              "save_pretrained, so `out` must be a local or mounted path")
        # Ray Train workers run in their own working directory: a relative local path given
        # to the driver must reach them absolute.
        for name in ("out", "prompts_dir", "sids_dir", "sft_dir", "base_model"):
            value = getattr(self, name, None)
            if isinstance(value, str) and value and "://" not in value:
                setattr(self, name, str(Path(value).expanduser().resolve()))
        positive = ("num_workers", "batch_size", "grad_accum", "logging_steps", "save_steps",
                    "lora_r", "lora_alpha", "max_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_worker <= 0:
            raise ConfigError("cpus_per_worker must be > 0 (e.g. 0.5 to fit 2 workers on 2 cores)")
        if self.max_steps < 1 and self.epochs <= 0:
            raise ConfigError("train for something: set epochs > 0 or max_steps > 0")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ConfigError("lora_dropout and warmup_ratio must be in [0, 1)")
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate must be > 0")
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules is empty: name modules or use ['all-linear']")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints must be >= 1 or null (keep all)")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ConfigError("early_stopping_patience must be >= 1 or null")
        if self.selection_rows < 1 or self.generation.top_k != 10:
            raise ConfigError("selection_rows must be >= 1 and generation.top_k 10 (hr@10)")
        if self.max_failures < 0 or self.report_every < 0:
            raise ConfigError("max_failures and report_every must be >= 0")
        for name in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 or null")


@dataclass
class SftConfig(TrainArgs):
    """Configuration of stage 4, ``leadre sft`` (fields of :class:`TrainArgs` apply too).

    Parameters:
        prompts_dir: output of ``leadre prompts``; its ``sft/train`` split is trained on and its
            ``sft/valid`` split (if any) drives evaluation, checkpoint choice, early stopping.
        sids_dir: the ``leadre sids`` directory; default: the one recorded by the prompts stage.
        base_model: a local causal-LM directory (Llama, Qwen2, ..., or the output of ``leadre
            base-model``) to fine-tune, prompts rendered through its chat template if it has
            one; ``None`` builds ``preset`` from scratch with a tokenizer trained on the prompts.
        preset: size of a model built from scratch: ``tiny`` (tests, the demo), ``base`` (a
            real catalog on a few CPU cores) or ``small`` (real runs on a GPU).
        tasks: train only on these tasks (``main``, ``aux_text2sid``, ``aux_sid2text``,
            ``aux_titles``); ``None`` = all (the paper's mix).
        tokenizer_corpus_rows: examples the from-scratch tokenizer is trained on.
        finetune: ``auto`` = ``full`` for a model built from scratch (LoRA on random weights
            has nothing to adapt) and ``lora`` for a pretrained ``base_model``.
        max_length: raised (with a warning, recorded in the manifest's ``token_lengths``) to
            the longest example when shorter: TRL cuts an example at its end, the answer.
        selection_metric: ``hr@10`` by default here: checkpoints are chosen (and training
            stopped early, with ``early_stopping_patience``) by the validation users' HR@10
            under constrained decoding; ``eval_loss`` when the prompts have no ``eval/valid``.
        dense_head: also train the dense head (:mod:`leadre.model.dense`): the next ad's
            vector in the S-ID stage's frozen encoder space, from the state the first S-ID
            token is decoded from; eval, warm and serve then fuse its candidates with the
            beam's. ``dense_weight``: its loss's weight beside the S-ID loss.
            ``dense_temperature``: the starting temperature of its softmax over cosine
            scores (learnt from there, CLIP-style).
            ``dense_negatives``: ``full`` = a softmax over every ad the model may be trained
            to answer (active, not held out as cold), ``in_batch`` = over the batch's answers.
            ``dense_soft_targets``: the answer's own share of its target (below 1: the rest
            spreads over the ads near it in the frozen space, softmax of cosine at the
            temperature that keeps this share on average in this catalog), so the head learns
            the region of the next ad, which holds ads it never trained on. ``dense_holdout``: this share of the
            trained ads never enters the head's softmax; validation users then price how an ad
            the model never learnt should be ranked (see ``fusion_rows``).
        fusion_rows: validation users the fusion weight (the dense head's share of the
            beam/dense mixture) is tuned on after training (HR@10 of the fused top 10, default
            decoding: 20 beams, 50 dense candidates). ``fusion_tolerance``: of the settings
            within this share of the best validation HR@10, the one that finds the most
            stand-in unseen ads is kept: new ads get the exposure the accuracy allows.
    """

    out: str = field(default="runs/sft", metadata={
        "help": "output directory (local or mounted path: model/, adapter/, merged/, ray/)"})
    sids_dir: str | None = field(default=None, metadata={
        "help": "`leadre sids` output; default: the one the prompts stage recorded"})
    base_model: str | None = field(default=None, metadata={
        "help": "local causal-LM directory to fine-tune; unset = build `preset` from scratch"})
    preset: PresetName = field(default="small", metadata={
        "help": "size of a model built from scratch (tiny: tests and the demo, base: a real "
                "catalog on a few CPU cores, small: real runs on a GPU)"})
    sid_init: Literal["codebook", "mean"] = field(default="codebook", metadata={
        "help": "how new S-ID token rows start: codebook (each quantiser level's code vectors, "
                "projected onto the hidden size by their principal directions and scaled to "
                "the vocabulary's norm: related codes start close) or mean (an average token)"})
    tasks: list[str] | None = field(default=None, metadata={
        "help": "train only on these tasks (main, aux_text2sid, aux_sid2text, aux_titles)"})
    tokenizer_corpus_rows: int = field(default=200_000, metadata={
        "help": "training examples the from-scratch BPE tokenizer learns from"})
    learning_rate: float = field(default=1e-3, metadata={
        "help": "peak learning rate (AdamW); LoRA on a small model likes ~1e-3"})
    finetune: Literal["auto", "lora", "full"] = field(default="auto", metadata={
        "help": "auto: full for a model built from scratch, lora for a pretrained base_model"})
    max_length: int = field(default=512, metadata={
        "help": "tokens per example; raised to the longest example (rendered prompt + S-ID + "
                "EOS) when shorter, so no answer is ever cut"})
    selection_metric: Literal["eval_loss", "hr@10"] = field(default="hr@10", metadata={
        "help": "checkpoint choice / early stopping: hr@10 (validation users, constrained "
                "decoding) or eval_loss"})
    dense_head: bool = field(default=True, metadata={
        "help": "also train a dense head predicting the next ad's encoder vector (fused "
                "ranking, ads never clicked)"})
    dense_weight: float = field(default=0.5, metadata={
        "help": "weight of the dense head's loss beside the S-ID loss"})
    dense_temperature: float = field(default=0.05, metadata={
        "help": "starting softmax temperature of the dense head's cosine scores (learnt)"})
    dense_negatives: Literal["full", "in_batch"] = field(default="full", metadata={
        "help": "dense softmax over every trainable ad (full) or the batch's answers (in_batch)"})
    dense_soft_targets: float = field(default=0.65, metadata={
        "help": "the answer's own share of its dense target; the rest spreads over the ads "
                "near it in the frozen space (1: the answer alone): the head learns regions, "
                "which hold the ads it never saw"})
    dense_holdout: float = field(default=0.1, metadata={
        "help": "share of the trained ads kept out of the dense head's softmax: on valid they "
                "stand for ads the model never trained on when the fusion is tuned"})
    fusion_tolerance: float = field(default=0.02, metadata={
        "help": "fusion operating point: of the settings within this share of the best "
                "validation HR@10, the one that finds the most stand-in unseen ads"})
    fusion_rows: int = field(default=512, metadata={
        "help": "validation users the beam/dense fusion weight is tuned on after training"})

    def __post_init__(self) -> None:
        super().__post_init__()
        from leadre.config import ConfigError

        if self.dense_weight < 0 or self.dense_temperature <= 0 or self.fusion_rows < 1 \
                or not 0 < self.dense_soft_targets <= 1 or not 0 <= self.dense_holdout < 1 \
                or not 0 <= self.fusion_tolerance < 1:
            raise ConfigError("dense_weight must be >= 0, dense_temperature > 0, "
                              "dense_soft_targets in (0, 1], dense_holdout and "
                              "fusion_tolerance in [0, 1) and fusion_rows >= 1")

        unknown = sorted(set(self.tasks or ()) - set(TASKS))
        if unknown:
            raise ConfigError(f"tasks: unknown task(s) {unknown}; valid: {list(TASKS)}")
        if self.tasks is not None and not self.tasks:
            raise ConfigError("tasks is empty: list tasks or leave it null for all")
        if self.tokenizer_corpus_rows < 1:
            raise ConfigError("tokenizer_corpus_rows must be >= 1")
        if self.finetune == "auto":
            self.finetune = "full" if self.base_model is None else "lora"


@dataclass
class DpoConfig(TrainArgs):
    """Configuration of stage 5, ``leadre dpo`` (fields of :class:`TrainArgs` apply too).

    Parameters:
        sft_dir: output directory of ``leadre sft`` (policy start and reference, see the module).
        prompts_dir: output of ``leadre prompts``; its ``dpo/train`` pairs are trained on.
        beta: DPO temperature: higher stays closer to the reference (paper/TRL default 0.1).
        loss_type: TRL loss(es): ``sigmoid`` = DPO, ``ipo``, ``hinge``, ``robust``, ...; several
            are summed with ``loss_weights``.
        heldout_split: pairs the before/after preference margin is measured on.
        pair_types: train (and measure) only on these pair types: ``value`` (the paper's
            business-value pairs, same category, chosen eCPM higher), ``interest_random`` /
            ``interest_hard`` (engaged ad vs a random / same-first-level negative); ``None`` =
            all of them.
    """

    out: str = field(default="runs/dpo", metadata={
        "help": "output directory (local or mounted path: model/, adapter/, merged/, ray/)"})
    sft_dir: str = field(default="runs/sft", metadata={"help": "output directory of `leadre sft`"})
    beta: float = field(default=0.1, metadata={
        "help": "DPO beta: deviation penalty from the reference (SFT) model"})
    loss_type: list[LossType] = field(default_factory=lambda: ["sigmoid"], metadata={
        "help": "TRL DPO loss type(s): sigmoid (DPO), ipo, hinge, robust, apo_zero, ..."})
    loss_weights: list[float] | None = field(default=None, metadata={
        "help": "weights of several loss types (default: 1 each)"})
    pair_types: list[str] | None = field(default=None, metadata={
        "help": "train only on these pair types (value, interest_random, interest_hard)"})
    heldout_split: Literal["valid", "test"] = field(default="test", metadata={
        "help": "split of DPO pairs the before/after preference margin is measured on"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    save_steps: int = field(default=100, metadata={
        "help": "optimiser steps between checkpoints (and validation runs)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.pair_types or ()) - set(PAIR_TYPES))
        if unknown or (self.pair_types is not None and not self.pair_types):
            raise ConfigError(f"pair_types: {self.pair_types!r}; list some of {list(PAIR_TYPES)}"
                              " or leave it null for all")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not self.loss_type:
            raise ConfigError("loss_type is empty; the DPO loss is ['sigmoid']")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(f"loss_weights has {len(self.loss_weights)} entries for "
                              f"{len(self.loss_type)} loss types")


@dataclass
class BaseModelConfig:
    """Configuration of ``leadre base-model``.

    Parameters:
        name: a :data:`BASE_MODELS` entry.
        out: the model directory written (``config.json``, safetensors, tokenizer, manifest).
            The GGUF is read from the installed model package (``make install``).
        layers: keep only the first N decoder layers (tests and smoke runs of the real
            tokenizer and weights); ``None`` = the whole model.
    """

    name: str = field(default="smollm2-135m", metadata={
        "help": f"packaged model to prepare ({', '.join(BASE_MODELS)})"})
    out: str = field(default="runs/base_model", metadata={
        "help": "output model directory (safetensors + tokenizer + manifest)"})
    layers: int | None = field(default=None, metadata={
        "help": "keep only the first N decoder layers (tests, smoke runs); unset = all"})

    def __post_init__(self) -> None:
        if self.name not in BASE_MODELS:
            raise ConfigError(f"unknown base model {self.name!r}; known: "
                              f"{', '.join(sorted(BASE_MODELS))}")
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"layers must be >= 1 or null, got {self.layers}")
        self.out = str(Path(self.out).expanduser().resolve())
