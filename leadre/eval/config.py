"""The configurations of stage 6: ``EvalConfig`` (``leadre eval``) and ``AblationConfig``
(``leadre ablation``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from leadre.config import ConfigError
from leadre.model.config import GenerationConfig
from leadre.runtime import RayConfig

VARIANTS = ("main_only", "aux", "cross_domain", "knowledge", "dpo")


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
        split: ``test`` (report) or ``valid`` (tuning). max_rows: that many users, picked by
        a stable hash of (seed, user id) (null = all).
    Fairness: filter_history drops each row's earlier ads from every ranking;
        ci_resamples: bootstrap resamples over users for the 95% intervals (0 = none).
    Decoding: generation (:class:`leadre.model.config.GenerationConfig`): beam_size,
        batch_size, max_prompt_tokens, device, ...; its top_k is set here (the largest K;
        all beams with filter_history).
    Execution: generate_on ``ray`` (Ray Data actor pool of ``generation.num_replicas`` model
        copies, ``generation.num_cpus`` / ``num_gpus`` each) or ``local`` (this process).
    Baselines: any of most_popular, sasrec, text_sasrec (SASRec whose items also carry a
        projection of the S-ID stage's frozen text vectors), embedding_ann, random. ``sasrec``
        (the config of both SASRecs) overrides
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
        "help": "score this many users, picked by a stable hash of (seed, user id) (null: all)"})
    filter_history: bool = field(default=False, metadata={
        "help": "drop the ads of each row's history from every method's ranking before "
                "the cut to K"})
    ci_resamples: int = field(default=1000, metadata={
        "help": "bootstrap resamples over users for the 95 percent interval of every "
                "HR/NDCG (0: none)"})
    ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10], metadata={
        "help": "cut-offs K of every @K metric"})
    history_groups: list[int] = field(default_factory=lambda: [3], metadata={
        "help": "also report HR/NDCG@10 for users with <= N ad engagements before the target "
                "and for the rest, per N"})
    channel_k: int | None = field(default=None, metadata={
        "help": "channel report: SASRec top-K merged with LEADRE top-K vs SASRec top-2K "
                "(needs beam_size >= K, or beam_size + dense_candidates >= K for a model "
                "with a dense head, and the sasrec baseline)"})
    generation: GenerationConfig = field(default_factory=GenerationConfig, metadata={
        "help": "decoding (beam_size, batch_size, device, ...) and the actor pool "
                "(num_replicas, num_cpus, num_gpus); top_k is set from ks"})
    generate_on: Literal["ray", "local"] = field(default="ray", metadata={
        "help": "ray: Ray Data map_batches with an actor pool; local: in this process"})
    baselines: list[str] = field(default_factory=lambda: ["most_popular", "sasrec", "text_sasrec",
                                                          "embedding_ann"],
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
        beam = self.generation.beam_size
        if max(self.ks) > beam:
            raise ConfigError(f"eval: the largest K ({max(self.ks)}) exceeds "
                              f"generation.beam_size ({beam}); raise generation.beam_size")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError("eval: max_rows must be >= 1 (or null for all rows)")
        # a fused ranking lists up to beam + dense candidates (checked per model in run)
        if self.channel_k is not None and (self.channel_k > self.generation.reach()
                                           or "sasrec" not in self.baselines):
            raise ConfigError(f"eval: channel_k={self.channel_k} needs generation.beam_size "
                              f"(+ dense_candidates for a model with a dense head) >= channel_k "
                              f"(got {beam}) and the sasrec baseline")
        if self.ci_resamples < 0:
            raise ConfigError("eval: ci_resamples must be >= 0 (0: no confidence intervals)")
        known = {f.name for f in dataclasses.fields(SasrecConfig)}
        for overrides in [self.sasrec, *self.sasrec_grid]:
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise ConfigError(f"eval: unknown SASRec option(s) {unknown}; valid: {sorted(known)}")

        # Filtering needs every beam: the history's ads are removed before the cut to K.
        self.generation.top_k = beam if self.filter_history else max(*self.ks,
                                                                     self.channel_k or 0)


@dataclass
class AblationConfig:
    """Configuration of ``leadre ablation`` (see the module docstring for the variants).

    ingest_dir / sids_dir: inputs of the prompts stage (override the YAML's prompts section).
    base_config: YAML file with ``prompts``, ``sft``, ``dpo``, ``eval`` sections (optional).
    prompts / sft / dpo / eval: override mappings applied on top of the YAML sections.
    variants: which rows to produce (a prefix of the cumulative chain is cheapest).
    reuse: skip any step whose output directory already holds a manifest.
    dry_run: build and validate every stage config, write the plan, run nothing.
    """

    ingest_dir: str | None = field(default=None, metadata={"help": "output of `leadre ingest`"})
    sids_dir: str | None = field(default=None, metadata={"help": "output of `leadre sids`"})
    out: str = field(default="runs/ablation", metadata={
        "help": "directory for every variant's stage outputs and the ablation table"})
    base_config: str | None = field(default=None, metadata={
        "help": "YAML whose prompts/sft/dpo/eval sections are the base stage configs"})
    prompts: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "PromptConfig overrides for every variant"})
    sft: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "SftConfig overrides for every variant"})
    dpo: dict[str, Any] = field(default_factory=dict, metadata={"help": "DpoConfig overrides"})
    eval: dict[str, Any] = field(default_factory=dict, metadata={"help": "EvalConfig overrides"})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={
        "help": f"rows of the table, any of {list(VARIANTS)}"})
    reuse: bool = field(default=True, metadata={
        "help": "reuse step outputs that already have a manifest (resume)"})
    dry_run: bool = field(default=False, metadata={
        "help": "validate and write the plan without running any stage"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={
        "help": "training seeds; each variant is trained once per seed (mean and 95% CI)"})
    dpo_grid: list[dict[str, Any]] = field(default_factory=list, metadata={
        "help": "DPO override sets swept from the cross_domain SFT model, picked on valid"})
    max_hr_loss: float = field(default=0.05, metadata={
        "help": "DPO operating point: largest relative HR@10 loss vs SFT allowed (on valid)"})

    def __post_init__(self) -> None:
        bad = sorted(set(self.variants) - set(VARIANTS))
        if bad or not self.variants:
            raise ConfigError(f"ablation: variants must be a non-empty subset of {list(VARIANTS)}"
                              f", got {self.variants}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"ablation: seeds must be distinct and non-empty, got {self.seeds}")
        if self.dpo_grid and not {"cross_domain", "knowledge"} & set(self.variants):
            raise ConfigError("ablation: dpo_grid sweeps from the knowledge (or cross_domain) "
                              "model: keep one of them")
        if not 0 <= self.max_hr_loss < 1:
            raise ConfigError("ablation: max_hr_loss is a relative loss in [0, 1)")
