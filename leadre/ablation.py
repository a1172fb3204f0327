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

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from leadre.artifacts import exists, join, read_manifest, resolve, write_manifest
from leadre.config import ConfigError, _merge, from_dict, read_yaml

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
    from leadre.dpo import DpoConfig
    from leadre.evaluate import EvalConfig
    from leadre.prompts import PromptConfig
    from leadre.sft import SftConfig

    base = read_yaml(cfg.base_config) if cfg.base_config else {}

    def section(name: str, extra: dict[str, Any]) -> dict[str, Any]:
        return _merge(_merge(base.get(name) or {}, getattr(cfg, name)), extra)

    want = [v for v in VARIANTS if v in cfg.variants]
    steps: list[Step] = []
    io = {k: v for k, v in (("ingest_dir", cfg.ingest_dir), ("sids_dir", cfg.sids_dir)) if v}
    p_base = section("prompts", io)
    need_ad = any(v in want for v in ("main_only", "aux"))
    need_xd = any(v in want for v in ("cross_domain", "dpo"))
    prompts_dirs = {}
    if need_ad:
        actions = [a for a in from_dict(PromptConfig, p_base).history_actions
                   if a not in CONTENT_ACTIONS]
        out = join(cfg.out, "prompts_ad")
        steps.append(Step("prompts_ad", "prompts", from_dict(
            PromptConfig, _merge(p_base, {"out": out, "history_actions": actions})), out))
        prompts_dirs["ad"] = out
    if need_xd:
        out = join(cfg.out, "prompts_xd")
        pc = from_dict(PromptConfig, _merge(p_base, {"out": out}))
        if not set(CONTENT_ACTIONS) & set(pc.history_actions):
            raise ConfigError("ablation: the cross_domain variant needs play/read in "
                              "prompts.history_actions")
        steps.append(Step("prompts_xd", "prompts", pc, out))
        prompts_dirs["xd"] = out

    sft_runs = {"main_only": ("ad", ["main"]), "aux": ("ad", None),
                "cross_domain": ("xd", None), "dpo": ("xd", None)}
    sft_dirs: dict[str, str] = {}
    for v in want:
        src, tasks = sft_runs[v]
        key = "cross_domain" if v == "dpo" else v
        if key in sft_dirs:
            continue
        out = join(cfg.out, f"sft_{key}")
        steps.append(Step(f"sft_{key}", "sft", from_dict(SftConfig, section(
            "sft", {"out": out, "prompts": prompts_dirs[src], "tasks": tasks})), out))
        sft_dirs[key] = out
    if "dpo" in want:
        out = join(cfg.out, "dpo")
        steps.append(Step("dpo", "dpo", from_dict(DpoConfig, section(
            "dpo", {"out": out, "prompts": prompts_dirs["xd"], "sft": sft_dirs["cross_domain"]})),
            out))
    rows: dict[str, str] = {}
    for i, v in enumerate(want):
        src = sft_runs[v][0]
        model = join(cfg.out, "dpo") if v == "dpo" else sft_dirs[v]
        out = join(cfg.out, f"eval_{v}")
        extra = {"out": out, "prompts_dir": prompts_dirs[src], "model_dir": model}
        if i < len(want) - 1:
            extra["baselines"] = []  # baselines once, with the last variant
        steps.append(Step(f"eval_{v}", "eval", from_dict(EvalConfig, section("eval", extra)), out))
        rows[v] = out
    return steps, rows


def _run_step(step: Step) -> None:
    import importlib

    module = {"prompts": "leadre.prompts", "sft": "leadre.sft", "dpo": "leadre.dpo",
              "eval": "leadre.evaluate"}[step.stage]
    importlib.import_module(module).run(step.config)


def table_rows(rows: dict[str, str]) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Metrics per variant (and the baselines of the last eval) from the eval outputs."""
    out: dict[str, dict[str, float]] = {}
    baselines: dict[str, dict[str, float]] = {}
    for variant, eval_dir in rows.items():
        fs, path = resolve(eval_dir)
        with fs.open_input_stream(f"{path}/metrics.json") as f:
            report = json.loads(f.read())
        for name, m in report["methods"].items():
            if name.startswith("leadre-"):
                out[variant] = m
            else:
                baselines[name] = m
    return out, baselines


def markdown(variants: dict[str, dict[str, float]], baselines: dict[str, dict[str, float]],
             k: int = 10) -> str:
    cols = [f"hr@5", f"hr@{k}", f"ndcg@5", f"ndcg@{k}", f"ecpm@{k}", f"value_hr@{k}", "invalid_rate"]
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
        _run_step(step)
        timings[step.name] = time.perf_counter() - t0
    variants, baselines = table_rows(rows)
    md = markdown(variants, baselines)
    fs, path = resolve(cfg.out)
    with fs.open_output_stream(f"{path}/ablation.md") as f:
        f.write(f"# Ablation (cumulative, as in the LEADRE paper)\n\n{md}\n".encode())
    with fs.open_output_stream(f"{path}/ablation.json") as f:
        f.write(json.dumps({"variants": variants, "baselines": baselines}, indent=2).encode())
    summary = {v: {c: round(m[c], 4) for c in ("hr@10", "ndcg@10", "ecpm@10") if c in m}
               for v, m in variants.items()}
    return write_manifest(cfg.out, STAGE, inputs={"ingest_dir": cfg.ingest_dir,
                                                  "sids_dir": cfg.sids_dir},
                          config=cfg, counts={"steps": len(steps), "variants": len(variants)},
                          timings=timings, extra={"plan": plan_json, "table": "ablation.md",
                                                  "summary": summary})
