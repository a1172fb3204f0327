"""``GenerationConfig``: how S-IDs are decoded and by how many model copies, the one typed
section that every config which decodes nests (``eval.generation``, ``warm.generation``,
``serve.generator.generation``, ``sft.generation`` for the hr@10 selection metric), the way
``ray: RayConfig`` is nested."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from leadre.config import ConfigError


@dataclass
class GenerationConfig:
    """Decoding settings plus the pool of model copies that decodes.

    Decoding:
        beam_size: beams per prompt (paper/serving default 20); beam search is exact when it
            is at least the number of active ads.
        top_k: candidates returned per prompt (<= beam_size); unset: one per beam. ``eval``
            sets it from its cut-offs; the training selection metric uses 10.
        max_prompt_tokens: prompts longer than this keep their last tokens (the recent
            behaviour and the question) and lose the start.
        batch_size: prompts decoded together (each holds ``beam_size`` rows of KV cache); in
            serving also the ``@serve.batch`` size.
        device: ``auto`` = CUDA when available, else CPU.
        dtype: model weights' dtype for inference; ``auto`` keeps CPU models as loaded and
            uses bfloat16 on GPUs that support it.
        merge_adapter: merge a PEFT LoRA adapter into the base weights before decoding (same
            outputs, faster).
        sort_by_length: group prompts of similar length into a batch (less padding); results
            come back in input order either way.
        bucket_slack: with ``sort_by_length``, a batch also ends where adding the next (longer)
            prompt would make its padding exceed this share of its real tokens (on CPU the
            padding costs more than the batching saves); ``None``: batches of ``batch_size``
            whatever their lengths.
        max_batch_tokens: a batch also ends where prompts x beams x its longest prompt would
            pass this many cached tokens (a beam-expanded KV cache that outgrows the CPU's
            caches makes a larger batch slower per prompt); 0: no limit; unset: 32768 on CPU,
            no limit on CUDA.
    Fused ranking (models trained with a dense head, :mod:`leadre.model.dense`):
        ranking: ``fused`` = the beam's top ``beam_size`` plus the dense head's top
            ``dense_candidates`` active ads, ranked by the mixture ``(1 - w) p_beam + w
            p_dense``; ``beam`` = the beam alone (what a model without a dense head does).
        dense_candidates: ads the dense head proposes per prompt (M).
        fusion_weight: ``w``, the dense head's share of the mixture (0: the beam alone, 1:
            the head alone); unset: the one tuned on validation users when the model was
            trained (``<model>/dense/head.json``).
    Pool (Ray's own vocabulary):
        num_replicas: model copies: Ray Data actors in ``eval`` and ``warm``, Serve replicas
            of the generator tier (``autoscaling_config`` there overrides it). Training
            ignores the pool: each Ray Train worker decodes its own slice.
        num_cpus: CPUs reserved per copy (its torch threads follow it).
        num_gpus: GPUs per copy; unset: 1 when the cluster has GPUs, else 0.
    """

    beam_size: int = field(default=20, metadata={"help": "beams per prompt"})
    top_k: int | None = field(default=None, metadata={
        "help": "candidates returned per prompt (<= beam_size; unset: one per beam)"})
    max_prompt_tokens: int = field(default=1024, metadata={
        "help": "longer prompts keep their last tokens"})
    batch_size: int = field(default=32, metadata={"help": "prompts decoded together"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto: CUDA when available, else CPU"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "inference dtype; auto: bfloat16 on capable GPUs, as loaded on CPU"})
    merge_adapter: bool = field(default=True, metadata={
        "help": "merge a PEFT adapter into the weights before decoding"})
    sort_by_length: bool = field(default=True, metadata={
        "help": "batch prompts of similar length together"})
    bucket_slack: float | None = field(default=0.25, metadata={
        "help": "end a batch where its padding would exceed this share of its tokens"})
    max_batch_tokens: int | None = field(default=None, metadata={
        "help": "end a batch at prompts x beams x length cached tokens (unset: 32768 on CPU)"})
    ranking: Literal["fused", "beam"] = field(default="fused", metadata={
        "help": "fused: beam + dense-head candidates, fused score (when the model has a dense "
                "head); beam: the trie beam alone"})
    dense_candidates: int = field(default=50, metadata={
        "help": "ads the dense head proposes per prompt, beside the beam's"})
    fusion_weight: float | None = field(default=None, metadata={
        "help": "the dense head's share w of the fused mixture (0..1); unset: the model's tuned one"})
    num_replicas: int = field(default=1, metadata={
        "help": "model copies (Ray Data actors in eval/warm, Serve replicas in serve)"})
    num_cpus: float = field(default=1.0, metadata={"help": "CPUs per model copy"})
    num_gpus: float | None = field(default=None, metadata={
        "help": "GPUs per model copy; unset: 1 when the cluster has GPUs, else 0"})

    def __post_init__(self) -> None:
        if self.bucket_slack is not None and self.bucket_slack < 0:
            raise ConfigError("generation.bucket_slack must be >= 0 (or unset)")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 0:
            raise ConfigError("generation.max_batch_tokens must be >= 0 (or unset)")
        if self.dense_candidates < 0 or (self.fusion_weight is not None
                                         and not 0 <= self.fusion_weight <= 1):
            raise ConfigError("generation.dense_candidates must be >= 0 and fusion_weight in "
                              "[0, 1]")
        if self.top_k is None:
            self.top_k = self.beam_size
        if min(self.beam_size, self.top_k, self.batch_size, self.max_prompt_tokens) < 1:
            raise ConfigError("generation: beam_size, top_k, batch_size and max_prompt_tokens "
                              "must be >= 1")
        if self.top_k > self.reach():
            raise ConfigError(f"generation: top_k={self.top_k} > beam_size={self.beam_size}"
                              + (f" + dense_candidates={self.dense_candidates}"
                                 if self.ranking == "fused" else "")
                              + ": beam search returns at most beam_size distinct ads (and a "
                              "dense head dense_candidates more); raise beam_size")
        if self.num_replicas < 1:
            raise ConfigError(f"generation: num_replicas must be >= 1, got {self.num_replicas}")
        if self.num_cpus < 0 or (self.num_gpus is not None and self.num_gpus < 0):
            raise ConfigError("generation: num_cpus and num_gpus must be >= 0")

    def reach(self) -> int:
        """The longest candidate list: the beam's, plus the dense head's when fused (a model
        without a dense head lists at most ``beam_size``)."""
        return self.beam_size + (self.dense_candidates if self.ranking == "fused" else 0)

    def gpus(self) -> float:
        """GPUs per copy, ``num_gpus`` or, unset, decided on the driver where the cluster is
        known (1 when it has GPUs)."""
        if self.num_gpus is not None:
            return self.num_gpus
        import sys

        ray = sys.modules.get("ray")  # never start a cluster just to ask
        if ray is not None and ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
            return 1.0
        return 0.0

    def ray_resources(self) -> dict[str, Any]:
        """``num_cpus`` / ``num_gpus`` of one copy, as Ray Data and Ray Serve take them."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.gpus()}
