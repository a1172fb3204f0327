"""``leadre ablation``: one command for the paper-style ablation table, by driving
prompts -> sft -> dpo -> eval with config variants (cumulative, as in the LEADRE paper):

==============  =====================================================================
main_only       main task only; behaviour history without content-domain events
aux             + auxiliary alignment tasks (ad text <-> S-ID, titles-for-S-IDs)
cross_domain    + cross-domain facets (video plays and news reads in the behaviours)
dpo             + DPO on the cross_domain SFT model
==============  =====================================================================

Two prompt builds serve the four variants: ``prompts_ad`` (history actions click and
conversion only, auxiliary tasks built) feeds ``main_only`` (SFT on ``tasks=[main]``) and
``aux`` (all tasks); ``prompts_xd`` (the full facets) feeds ``cross_domain`` and ``dpo``.
Every eval scores the same split; the baselines run once, with the last variant.

Base settings come from a YAML file whose ``prompts``, ``sft``, ``dpo`` and ``eval`` sections
configure those stages (the same file the single stages read), then the per-stage override
mappings below. A step whose output manifest already exists is reused (``reuse``), so an
interrupted ablation resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from leadre.artifacts import (exists, join, read_json, read_manifest, write_json, write_manifest,
                              write_text)
from leadre.config import ConfigError, from_dict, merge, read_yaml
from leadre.stages import run_stage, wire, wired_options

log = logging.getLogger(__name__)
STAGE = "ablation"
VARIANTS = ("main_only", "aux", "cross_domain", "dpo")
CONTENT_ACTIONS = ("play", "read")


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

    def __post_init__(self) -> None:
        bad = sorted(set(self.variants) - set(VARIANTS))
        if bad or not self.variants:
            raise ConfigError(f"ablation: variants must be a non-empty subset of {list(VARIANTS)}"
                              f", got {self.variants}")


@dataclass
class Step:
    name: str
    stage: str  # prompts | sft | dpo | eval
    config: Any
    out: str


def plan(cfg: AblationConfig) -> tuple[list[Step], dict[str, str]]:
    """The ordered stage runs and, per variant, the eval directory that holds its row."""
    from leadre.prompts import PromptConfig

    base = read_yaml(cfg.base_config) if cfg.base_config else {}
    steps: list[Step] = []

    def section(name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return merge(merge(base.get(name) or {}, getattr(cfg, name)), extra or {})

    def step(name: str, stage: str, dirs: dict[str, str],
             extra: dict[str, Any] | None = None) -> None:
        steps.append(Step(name, stage, wire(stage, dirs, section(stage, extra)), dirs[stage]))

    want = [v for v in VARIANTS if v in cfg.variants]
    # The prompts stage's inputs; unset ones keep the YAML's prompts section.
    upstream = {k: v for k, v in (("ingest", cfg.ingest_dir), ("sids", cfg.sids_dir)) if v}
    p_base = from_dict(PromptConfig, section("prompts", wired_options("prompts", upstream)))
    prompts_dirs = {}
    if any(v in want for v in ("main_only", "aux")):
        actions = [a for a in p_base.history_actions if a not in CONTENT_ACTIONS]
        prompts_dirs["ad"] = join(cfg.out, "prompts_ad")
        step("prompts_ad", "prompts", {**upstream, "prompts": prompts_dirs["ad"]},
             {"history_actions": actions})
    if any(v in want for v in ("cross_domain", "dpo")):
        if not set(CONTENT_ACTIONS) & set(p_base.history_actions):
            raise ConfigError("ablation: the cross_domain variant needs play/read in "
                              "prompts.history_actions")
        prompts_dirs["xd"] = join(cfg.out, "prompts_xd")
        step("prompts_xd", "prompts", {**upstream, "prompts": prompts_dirs["xd"]})

    sft_runs = {"main_only": ("ad", ["main"]), "aux": ("ad", None),
                "cross_domain": ("xd", None), "dpo": ("xd", None)}
    sft_dirs: dict[str, str] = {}
    for v in want:
        src, tasks = sft_runs[v]
        key = "cross_domain" if v == "dpo" else v
        if key in sft_dirs:
            continue
        sft_dirs[key] = join(cfg.out, f"sft_{key}")
        step(f"sft_{key}", "sft", {"prompts": prompts_dirs[src], "sft": sft_dirs[key]},
             {"tasks": tasks})
    if "dpo" in want:
        step("dpo", "dpo", {"prompts": prompts_dirs["xd"], "sft": sft_dirs["cross_domain"],
                            "dpo": join(cfg.out, "dpo")})
    rows: dict[str, str] = {}
    for i, v in enumerate(want):
        model = {"dpo": join(cfg.out, "dpo")} if v == "dpo" else {"sft": sft_dirs[v]}
        rows[v] = join(cfg.out, f"eval_{v}")
        step(f"eval_{v}", "eval",
             {"prompts": prompts_dirs[sft_runs[v][0]], **model, "eval": rows[v]},
             # baselines once, with the last variant
             {"baselines": []} if i < len(want) - 1 else None)
    return steps, rows


def table_rows(rows: dict[str, str]) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Metrics per variant (and the baselines of the last eval) from the eval outputs."""
    out: dict[str, dict[str, float]] = {}
    baselines: dict[str, dict[str, float]] = {}
    for variant, eval_dir in rows.items():
        report = read_json(eval_dir, "metrics.json")
        for name, m in report["methods"].items():
            if name.startswith("leadre-"):
                out[variant] = m
            else:
                baselines[name] = m
    return out, baselines


def markdown(variants: dict[str, dict[str, float]], baselines: dict[str, dict[str, float]],
             k: int = 10) -> str:
    cols = ["hr@5", f"hr@{k}", "ndcg@5", f"ndcg@{k}", f"ecpm@{k}", f"value_hr@{k}", "invalid_rate"]
    cols = [c for c in cols if any(c in m for m in variants.values())]
    head = ["variant", *cols, f"Δhr@{k} vs previous", f"Δecpm@{k} vs previous"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    prev = None

    def fmt(v):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    def rel(a, b):
        if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
            return "–"
        return f"{100 * (a - b) / b:+.1f}%"

    for name, m in [*variants.items(), *baselines.items()]:
        d_hr = rel(m.get(f"hr@{k}"), prev.get(f"hr@{k}")) if prev and name in variants else ""
        d_ec = rel(m.get(f"ecpm@{k}"), prev.get(f"ecpm@{k}")) if prev and name in variants else ""
        lines.append("| " + " | ".join([name, *(fmt(m.get(c)) for c in cols), d_hr, d_ec]) + " |")
        if name in variants:
            prev = m
    return "\n".join(lines)


def run(cfg: AblationConfig) -> dict[str, Any]:
    steps, rows = plan(cfg)
    timings: dict[str, float] = {}
    plan_json = [{"name": s.name, "stage": s.stage, "out": s.out} for s in steps]
    if cfg.dry_run:
        return write_manifest(cfg.out, STAGE, inputs={"ingest_dir": cfg.ingest_dir,
                                                      "sids_dir": cfg.sids_dir},
                              config=cfg, counts={"steps": len(steps)}, timings={},
                              extra={"plan": plan_json, "summary": {"dry_run": True,
                                                                    "steps": plan_json}})
    for step in steps:
        if cfg.reuse and exists(join(step.out, "manifest.json")) and \
                read_manifest(step.out).get("stage") == step.stage:
            log.info("ablation: reusing %s (%s)", step.name, step.out)
            continue
        log.info("ablation: running %s -> %s", step.name, step.out)
        t0 = time.perf_counter()
        run_stage(step.stage, step.config)
        timings[step.name] = time.perf_counter() - t0
    variants, baselines = table_rows(rows)
    md = markdown(variants, baselines)
    write_text(cfg.out, "ablation.md", f"# Ablation (cumulative, as in the LEADRE paper)\n\n{md}\n")
    write_json(cfg.out, "ablation.json", {"variants": variants, "baselines": baselines})
    summary = {v: {c: round(m[c], 4) for c in ("hr@10", "ndcg@10", "ecpm@10") if c in m}
               for v, m in variants.items()}
    return write_manifest(cfg.out, STAGE, inputs={"ingest_dir": cfg.ingest_dir,
                                                  "sids_dir": cfg.sids_dir},
                          config=cfg, counts={"steps": len(steps), "variants": len(variants)},
                          timings=timings, extra={"plan": plan_json, "table": "ablation.md",
                                                  "summary": summary})
