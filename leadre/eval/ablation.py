"""``leadre ablation``: one command for the paper-style ablation table, by driving
prompts -> sft -> dpo -> eval with config variants (cumulative, as in the LEADRE paper):

==============  =====================================================================
main_only       main task only; behaviour history without content-domain events
aux             + auxiliary alignment tasks (ad text <-> S-ID, titles-for-S-IDs)
cross_domain    + cross-domain facets (video plays and news reads, shown as their titles)
knowledge       + knowledge tokens: content events shown as their frozen vectors' codes,
                and S-ID token rows started from their codebook vectors
dpo             + DPO on the last SFT model (knowledge, else cross_domain)
==============  =====================================================================

Three prompt builds serve the variants: ``prompts_ad`` (history actions click and
conversion only, auxiliary tasks built) feeds ``main_only`` (SFT on ``tasks=[main]``) and
``aux`` (all tasks); ``prompts_xd`` (content as titles) feeds ``cross_domain``;
``prompts_kn`` (content as knowledge tokens) feeds ``knowledge`` and ``dpo``. Every eval
scores the same split; the baselines run once, with the last variant.

**Equal budget.** Every SFT variant trains exactly ``sft.max_steps`` optimizer steps (an
epoch budget would give the variants with more examples more steps, and their gain could
not be told from the extra training); the plan refuses an SFT section without it.

Every variant is trained once per seed of ``seeds`` and the table reports the mean and a 95%
confidence interval over them (Student's t); every variant is scored on the same users (the
eval stage samples users by a hash of their id). When the eval stage reports metrics by ad-history length (``groups``), the table
shows HR@10 per group: the paper's claim is that content-domain behaviour helps most the users
with a sparse ad history.

``dpo_grid`` sweeps DPO settings (e.g. ``beta``, ``max_steps``) from the SFT model DPO starts
from (knowledge, else cross_domain), of the first seed. Each point is scored on the *valid* split; the operating point is the
one with the highest eCPM@10 whose HR@10 is within ``max_hr_loss`` (relative) of the SFT
model's on valid; only that point is then scored on test. ``dpo_frontier.png`` plots the
sweep.

Base settings come from a YAML file whose ``prompts``, ``sft``, ``dpo`` and ``eval`` sections
configure those stages (the same file the single stages read), then the per-stage override
mappings below. A step whose output manifest already exists is reused (``reuse``), so an
interrupted ablation resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from leadre.artifacts import (exists, join, read_json, read_manifest, write_json, write_manifest,
                              write_text)
from leadre.config import ConfigError, from_dict, merge, read_yaml
from leadre.eval.config import VARIANTS, AblationConfig
from leadre.stages import run_stage, wire, wired_options

log = logging.getLogger(__name__)
STAGE = "ablation"
CONTENT_ACTIONS = ("play", "read")


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
    for key, content in (("xd", "title"), ("kn", "code")):
        users = ("cross_domain",) if key == "xd" else ("knowledge", "dpo")
        if not any(v in want for v in users):
            continue
        if not set(CONTENT_ACTIONS) & set(p_base.history_actions):
            raise ConfigError(f"ablation: the {users[0]} variant needs play/read in "
                              "prompts.history_actions")
        prompts_dirs[key] = join(cfg.out, f"prompts_{key}")
        step(f"prompts_{key}", "prompts", {**upstream, "prompts": prompts_dirs[key]},
             {"content_object": content})

    # variant -> (prompt build, SFT tasks, S-ID row init); dpo starts from the last SFT model
    sft_runs = {"main_only": ("ad", ["main"], "mean"), "aux": ("ad", None, "mean"),
                "cross_domain": ("xd", None, "mean"), "knowledge": ("kn", None, "codebook")}
    dpo_from = "knowledge" if "knowledge" in want or "cross_domain" not in want else "cross_domain"
    if "dpo" in want:
        sft_runs["dpo"] = sft_runs[dpo_from]
    rows: dict[str, dict[int, str]] = {v: {} for v in want}
    for n_seed, seed in enumerate(cfg.seeds):
        sft_dirs: dict[str, str] = {}
        for v in want:
            key = dpo_from if v == "dpo" else v
            if key in sft_dirs:
                continue
            src, tasks, init = sft_runs[key]
            sft_dirs[key] = join(cfg.out, f"sft_{key}_s{seed}")
            step(f"sft_{key}_s{seed}", "sft", {"prompts": prompts_dirs[src], "sft": sft_dirs[key]},
                 {"tasks": tasks, "seed": seed, "sid_init": init})
            if steps[-1].config.max_steps < 1:
                raise ConfigError("ablation: every variant trains the same number of optimizer "
                                  "steps: set sft.max_steps (an epoch budget gives variants "
                                  "with more examples more steps)")
        if "dpo" in want:
            step(f"dpo_s{seed}", "dpo", {"prompts": prompts_dirs[sft_runs["dpo"][0]],
                                          "sft": sft_dirs[dpo_from],
                                          "dpo": join(cfg.out, f"dpo_s{seed}")}, {"seed": seed})
        for i, v in enumerate(want):
            model = ({"dpo": join(cfg.out, f"dpo_s{seed}")} if v == "dpo"
                     else {"sft": sft_dirs[v]})
            rows[v][seed] = join(cfg.out, f"eval_{v}_s{seed}")
            last = n_seed == 0 and i == len(want) - 1  # baselines once
            step(f"eval_{v}_s{seed}", "eval",
                 {"prompts": prompts_dirs[sft_runs[v][0]], **model, "eval": rows[v][seed]},
                 None if last else {"baselines": []})
        if n_seed == 0 and cfg.dpo_grid:
            src = prompts_dirs[sft_runs[dpo_from][0]]
            valid_only = {"baselines": [], "split": "valid"}
            step("eval_dpo_base_valid", "eval",
                 {"prompts": src, "sft": sft_dirs[dpo_from],
                  "eval": join(cfg.out, "eval_dpo_base_valid")}, valid_only)
            for g, point in enumerate(cfg.dpo_grid):
                out = join(cfg.out, f"dpo_sweep{g}")
                step(f"dpo_sweep{g}", "dpo", {"prompts": src, "sft": sft_dirs[dpo_from],
                                               "dpo": out},
                     {**point, "seed": seed})
                step(f"eval_sweep{g}_valid", "eval",
                     {"prompts": src, "dpo": out,
                      "eval": join(cfg.out, f"eval_sweep{g}_valid")}, valid_only)
    return steps, rows


def _leadre(eval_dir: str) -> dict[str, Any]:
    report = read_json(eval_dir, "metrics.json")
    return next(m for n, m in report["methods"].items() if n.startswith("leadre-"))


# Student's t quantile 0.975 by degrees of freedom (beyond the table: the normal's 1.96).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}


def _mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% confidence interval over the seeds; 0 for one seed)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    n = len(vals)
    mean = sum(vals) / n
    if n == 1:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return mean, T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def _flat(m: dict[str, Any]) -> dict[str, float]:
    """A method's scalar metrics plus, per ad-history group, ``hr@10[<group>]``."""
    out = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    for group, gm in (m.get("groups") or {}).items():
        out[f"hr@10[{group}]"] = gm.get("hr@10", float("nan"))
    return out


def table_rows(rows: dict[str, dict[int, str]]
               ) -> tuple[dict[str, dict[str, tuple[float, float]]], dict[str, Any]]:
    """Per variant, (mean, 95% CI half-width) over seeds of every metric; and the
    baselines' metrics."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    baselines: dict[str, dict[str, float]] = {}
    for variant, by_seed in rows.items():
        runs = []
        for eval_dir in by_seed.values():
            report = read_json(eval_dir, "metrics.json")
            for name, m in report["methods"].items():
                if name.startswith("leadre-"):
                    runs.append(_flat(m))
                else:
                    baselines[name] = _flat(m)
        keys = sorted({k for r in runs for k in r})
        out[variant] = {k: _mean_ci([r.get(k, float("nan")) for r in runs]) for k in keys}
        out[variant]["seeds"] = (len(runs), 0.0)
    return out, baselines


def pick_operating_point(sft: dict[str, float], points: list[dict[str, float]],
                         max_hr_loss: float) -> int | None:
    """Index of the point with the highest eCPM@10 whose HR@10 is at most ``max_hr_loss``
    (relative) below the SFT model's; None if no point qualifies."""
    floor = sft["hr@10"] * (1 - max_hr_loss)
    ok = [i for i, p in enumerate(points) if p["hr@10"] >= floor]
    return max(ok, key=lambda i: points[i]["ecpm@10"]) if ok else None


def plot_frontier(sft: dict[str, float], points: list[dict[str, float]],
                  labels: list[str], chosen: int | None, out: str) -> str:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([p["ecpm@10"] for p in points], [p["hr@10"] for p in points], label="DPO sweep")
    for p, lab in zip(points, labels):
        ax.annotate(lab, (p["ecpm@10"], p["hr@10"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.scatter([sft["ecpm@10"]], [sft["hr@10"]], marker="*", s=160, color="C3", label="SFT")
    if chosen is not None:
        c = points[chosen]
        ax.scatter([c["ecpm@10"]], [c["hr@10"]], s=160, facecolors="none", edgecolors="k",
                   label="operating point")
    ax.axhline(sft["hr@10"] * 0.95, ls=":", color="grey", lw=1, label="SFT HR@10 - 5%")
    ax.axvline(sft["ecpm@10"] * 1.05, ls="--", color="grey", lw=1, label="SFT eCPM@10 + 5%")
    ax.set_xlabel("eCPM@10 (valid)")
    ax.set_ylabel("HR@10 (valid)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_text(out, "dpo_frontier.png", buf.getvalue())


def markdown(variants: dict[str, dict[str, tuple[float, float]]],
             baselines: dict[str, dict[str, float]], k: int = 10) -> str:
    """Variants as mean ± 95% CI half-width over seeds, then the baselines; Δ columns compare
    the means of consecutive variants."""
    cols = ["hr@5", f"hr@{k}", "ndcg@5", f"ndcg@{k}", f"ecpm@{k}", f"value_hr@{k}",
            "invalid_rate"]
    groups = sorted({c for m in variants.values() for c in m if c.startswith(f"hr@{k}[")})
    cols = [c for c in cols + groups if any(c in m for m in variants.values())]
    head = ["variant", "seeds", *cols, f"Δhr@{k} vs previous", f"Δecpm@{k} vs previous"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v) -> str:
        if isinstance(v, tuple):
            mean, half = v
            if math.isnan(mean):
                return "–"
            return f"{mean:.4f} ± {half:.4f}" if half else f"{mean:.4f}"
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    def mean(m: dict[str, Any], c: str) -> float | None:
        v = m.get(c)
        return v[0] if isinstance(v, tuple) else v

    def rel(a, b) -> str:
        if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
            return "–"
        return f"{100 * (a - b) / b:+.1f}%"

    prev = None
    for name, m in variants.items():
        d_hr = rel(mean(m, f"hr@{k}"), mean(prev, f"hr@{k}")) if prev else ""
        d_ec = rel(mean(m, f"ecpm@{k}"), mean(prev, f"ecpm@{k}")) if prev else ""
        seeds = str(int(m["seeds"][0])) if "seeds" in m else "1"
        lines.append("| " + " | ".join([name, seeds, *(fmt(m.get(c)) for c in cols), d_hr,
                                        d_ec]) + " |")
        prev = m
    for name, m in baselines.items():
        lines.append("| " + " | ".join([name, "–", *(fmt(m.get(c)) for c in cols), "", ""])
                     + " |")
    return "\n".join(lines)


def _dpo_sweep(cfg: AblationConfig, steps: list[Step], timings: dict[str, float]
               ) -> dict[str, Any] | None:
    """Pick the DPO operating point on valid, score it on test, plot the frontier."""
    if not cfg.dpo_grid:
        return None
    sft = _leadre(join(cfg.out, "eval_dpo_base_valid"))
    points = [_leadre(join(cfg.out, f"eval_sweep{g}_valid")) for g in range(len(cfg.dpo_grid))]
    labels = [",".join(f"{k}={v}" for k, v in p.items()) for p in cfg.dpo_grid]
    chosen = pick_operating_point(sft, points, cfg.max_hr_loss)
    png = plot_frontier(sft, points, labels, chosen, cfg.out)
    result: dict[str, Any] = {
        "valid": {"sft": {c: sft[c] for c in ("hr@10", "ecpm@10")},
                  "points": [{"settings": s, "hr@10": p["hr@10"], "ecpm@10": p["ecpm@10"]}
                             for s, p in zip(cfg.dpo_grid, points)]},
        "chosen": None if chosen is None else cfg.dpo_grid[chosen], "plot": png}
    if chosen is None:
        return result
    dpo_from = "knowledge" if any(s.name.startswith("sft_knowledge") for s in steps) \
        else "cross_domain"
    base = next(s for s in steps if s.name == f"eval_{dpo_from}_s{cfg.seeds[0]}")
    test_cfg = dataclasses.replace(base.config, model_dir=join(cfg.out, f"dpo_sweep{chosen}"),
                                   out=join(cfg.out, "eval_dpo_chosen_test"), baselines=[])
    t0 = time.perf_counter()
    run_stage("eval", test_cfg)
    timings["eval_dpo_chosen_test"] = time.perf_counter() - t0
    sft_test = _leadre(base.out)
    got = _leadre(join(cfg.out, "eval_dpo_chosen_test"))
    d_hr = got["hr@10"] / sft_test["hr@10"] - 1 if sft_test["hr@10"] else float("nan")
    d_ec = got["ecpm@10"] / sft_test["ecpm@10"] - 1 if sft_test["ecpm@10"] else float("nan")
    result["test"] = {"sft": {c: sft_test[c] for c in ("hr@10", "ecpm@10")},
                      "dpo": {c: got[c] for c in ("hr@10", "ecpm@10")},
                      "delta_hr@10": d_hr, "delta_ecpm@10": d_ec,
                      "target_met": bool(d_ec >= 0.05 and d_hr >= -0.05)}
    return result


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
    sweep = _dpo_sweep(cfg, steps, timings)
    md = markdown(variants, baselines)
    if sweep and sweep.get("test"):
        s = sweep["test"]
        md += (f"\n\nDPO operating point (picked on valid): {sweep['chosen']}; on test HR@10 "
               f"{s['delta_hr@10']:+.1%}, eCPM@10 {s['delta_ecpm@10']:+.1%} vs the SFT model "
               f"(target: eCPM@10 >= +5% at HR@10 >= -5%: "
               f"{'met' if s['target_met'] else 'not met'}).")
    elif sweep:
        md += "\n\nDPO sweep: no point kept HR@10 within the allowed loss on valid."
    write_text(cfg.out, "ablation.md", f"# Ablation (cumulative, as in the LEADRE paper)\n\n{md}\n")
    write_json(cfg.out, "ablation.json", {"variants": variants, "baselines": baselines,
                                          "dpo_sweep": sweep})
    summary = {v: {c: round(m[c][0], 4) for c in ("hr@10", "ndcg@10", "ecpm@10") if c in m}
               for v, m in variants.items()}
    return write_manifest(cfg.out, STAGE, inputs={"ingest_dir": cfg.ingest_dir,
                                                  "sids_dir": cfg.sids_dir},
                          config=cfg, counts={"steps": len(steps), "variants": len(variants)},
                          timings=timings, extra={"plan": plan_json, "table": "ablation.md",
                                                  "summary": summary})
