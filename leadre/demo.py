"""`leadre demo`: the whole pipeline on the embedded synthetic world, stage by stage, each
stage writing its artifact directory under ``out`` exactly as the stand-alone commands do:

    generate -> ingest -> sids -> prompts -> sft -> dpo -> eval -> index -> warm -> serve (+ HTTP)

Sizes are chosen to finish in about 8 minutes on a quiet 2-core CPU machine, most of it SFT
(1,200 steps buy a model that beats the embedding-ANN baseline); every knob of every
stage stays reachable through that stage's own command.

The terminal gets one line per stage and a short summary at the end. Everything the stages
and their libraries print goes to ``<out>/logs/<stage>.log`` (``<out>/logs/ray`` links the Ray
session's logs, where the workers' output is); ``verbose`` prints it all as it happens.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leadre.console import Console, link_ray_logs, tail
from leadre.runtime import RayConfig, init_ray
from leadre.stages import pipeline_dirs, run_stage, wire
from leadre.model.factory import PresetName

PIPELINE = ("generate", "ingest", "sids", "prompts", "sft", "dpo", "eval", "index", "warm",
            "serve")
SUMMARY_K = 10


@dataclass
class DemoConfig:
    """Size of the demo world, training budget, and where the artifacts go."""

    out: str = field(default="runs/demo", metadata={"help": "directory for all stage outputs"})
    users: int = field(default=2000, metadata={"help": "synthetic users"})
    ads: int = field(default=500, metadata={"help": "synthetic ads"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    corrupt_share: float = field(default=0.002, metadata={
        "help": "share of malformed log rows injected to show the ingest quarantine at work"})
    preset: PresetName = field(default="tiny", metadata={
        "help": "model preset built from scratch"})
    workers: int = field(default=2, metadata={"help": "Ray Train workers for SFT and DPO"})
    max_events: int = field(default=12, metadata={
        "help": "most recent behaviours in a prompt (the prompts stage's default is 20)"})
    short_prompts: bool = field(default=True, metadata={
        "help": "leave out the instruction and question sentences: the same words in every "
                "prompt, which a model built from scratch pays for at every step and learns "
                "nothing from"})
    sft_steps: int = field(default=1200, metadata={
        "help": "SFT optimiser steps (full fine-tune of the model built from scratch, 32 "
                "examples a step: ~2.5 epochs of the 15k examples)"})
    sft_lr: float = field(default=3e-3, metadata={"help": "SFT peak learning rate"})
    aux_tasks: bool = field(default=False, metadata={
        "help": "SFT also on the auxiliary alignment tasks (ad text <-> S-ID, titles for "
                "S-IDs); with the same step budget they take steps from the main task "
                "(valid HR@10 0.339 with them, 0.348 without: bench/bench_knowledge.py)"})
    dpo_steps: int = field(default=30, metadata={
        "help": "DPO optimiser steps on the business-value pairs"})
    eval_rows: int | None = field(default=None, metadata={
        "help": "test users scored by the evaluator (null: all of them)"})
    cold_fraction: float = field(default=0.1, metadata={
        "help": "share of ads held out of training (quantiser and every interaction): test "
                "targets only, reached through the dense head (0: off)"})
    beam_size: int = field(default=20, metadata={
        "help": "beam width of constrained decoding (the dense head adds 50 candidates; its "
                "fusion weight is tuned with 20 beams)"})
    channel_k: int = field(default=50, metadata={
        "help": "channel view: SASRec top K + LEADRE top K against SASRec top 2K"})
    port: int = field(default=8000, metadata={"help": "HTTP port of the demo's Serve app"})
    requests: int = field(default=3, metadata={"help": "users to query over HTTP at the end"})
    verbose: bool = field(default=False, metadata={
        "help": "print the libraries' logs (Ray, Ray Data, Ray Train, ...) on the terminal "
                "instead of only to <out>/logs"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray connection"})


def _settings(cfg: DemoConfig) -> dict[str, dict[str, Any]]:
    """The demo's choices per stage; the input/output directories come from the wiring."""
    ray, seed = {"ray": cfg.ray}, {"seed": cfg.seed}
    # Contexts only at warm-up: the serving generator fills candidates asynchronously on first
    # request, which is what the demo shows. A production warm-up also generates.
    store = {"store_url": _store_url(cfg)}
    return {
        "generate": {"users": cfg.users, "ads": cfg.ads, "corrupt_share": cfg.corrupt_share,
                     **seed},
        "ingest": {"cold_fraction": cfg.cold_fraction, **ray},
        # MiniLM vectors, RQ-VAE codes: chosen on valid (bench/bench_knowledge.py)
        "sids": {**seed, **ray},
        "prompts": {"max_events": cfg.max_events, "instruction": not cfg.short_prompts,
                    "question": not cfg.short_prompts, **seed, **ray},
        # Checkpoints are picked by the validation users' HR@10 (the SFT stage's default).
        "sft": {"preset": cfg.preset, "num_workers": cfg.workers, "max_steps": cfg.sft_steps,
                "tasks": None if cfg.aux_tasks else ["main"],
                "batch_size": 16, "learning_rate": cfg.sft_lr, "save_steps": cfg.sft_steps // 3,
                "logging_steps": 50, **seed, **ray},
        "dpo": {"num_workers": cfg.workers, "max_steps": cfg.dpo_steps, "pair_types": ["value"],
                "learning_rate": 1e-4, "save_steps": cfg.dpo_steps, **seed, **ray},
        # Both training stages are scored on the same users, so the table shows what DPO did.
        "eval": {"max_rows": cfg.eval_rows, "generation": {"beam_size": cfg.beam_size},
                 "compare_dirs": [_stage_dir(cfg, "sft")], "channel_k": cfg.channel_k,
                 **seed, **ray},
        "index": seed,
        "warm": {**store, "contexts_only": True, **ray},
        "serve": {**store, "port": cfg.port, "blocking": False, **ray},
    }


def _stage_dir(cfg: DemoConfig, stage: str) -> str:
    return pipeline_dirs(cfg.out, PIPELINE)[stage]


def _store_url(cfg: DemoConfig) -> str:
    from leadre import artifacts
    return f"sqlite:///{artifacts.resolve(cfg.out)[1]}/store.db"


def _post(url: str, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _serve_and_query(cfg: DemoConfig, dirs: dict[str, str],
                     settings: dict[str, Any]) -> dict[str, Any]:
    """Deploy the two-tier graph on the DPO model, then ask for a few users twice: the first
    answer comes from the real-time ANN fallback (cache miss, generation queued), the second
    from the LLM's generated candidates once the generator has filled the store."""
    from ray import serve

    served = run_stage("serve", wire("serve", dirs, settings))
    url = served["summary"]["recommend"]
    interests = user_interests(dirs)
    answers: dict[str, Any] = {}
    try:
        for user in pick_users(interests, cfg.requests):
            first = _post(url, {"user_id": user, "k": 5})
            second = first
            deadline = time.time() + 60
            while second["cache"] != "hit" and time.time() < deadline:
                time.sleep(2)
                second = _post(url, {"user_id": user, "k": 5})
            answers[user] = {"first": first, "later": second}
    except (urllib.error.URLError, OSError) as e:
        answers["error"] = f"HTTP request failed: {e}"
    finally:
        serve.shutdown()
    return {"summary": {"url": url, "answers": {
        u: {"first_cache": a["first"]["cache"], "later_cache": a["later"]["cache"],
            "interests": interests.get(u, []),
            "ads": [x["ad_id"] for x in a["later"]["ads"]],
            "sources": [x["source"] for x in a["later"]["ads"]]} if isinstance(a, dict) else a
        for u, a in answers.items()}}}


def user_interests(dirs: dict[str, str], top: int = 3) -> dict[str, list[str]]:
    """Each test user's most engaged ad categories before the test window (the eval rows'
    history), most frequent first: what the demo shows next to the ads a user gets."""
    from leadre import artifacts
    from leadre.prompts.contract import read_split

    rows = read_split(dirs["prompts"], "eval", "test", ["user_id", "history_ad_ids"])
    ads = artifacts.read_table(dirs["ingest"], "ads").select(["ad_id", "category"]).to_pydict()
    category = dict(zip(ads["ad_id"], ads["category"]))
    out: dict[str, list[str]] = {}
    for user, hist in zip(rows.column("user_id").to_pylist(),
                          rows.column("history_ad_ids").to_pylist()):
        counts: dict[str, int] = {}
        for ad in hist or []:
            c = category.get(ad)
            if c:
                counts[c] = counts.get(c, 0) + 1
        out[user] = sorted(counts, key=lambda c: (-counts[c], c))[:top]
    return out


def pick_users(interests: dict[str, list[str]], n: int) -> list[str]:
    """``n`` test users whose main interests differ (first come, in the eval rows' order), so
    the demo shows whether recommendations follow the user rather than the crowd."""
    picked: list[str] = []
    seen: set[str] = set()
    for user, cats in interests.items():
        if cats and cats[0] not in seen:
            picked.append(user)
            seen.add(cats[0])
        if len(picked) == n:
            return picked
    rest = [u for u in interests if u not in picked]
    return picked + rest[: n - len(picked)]


# --------------------------------------------------------------------------- the terminal


def _stage_note(name: str, s: dict[str, Any]) -> str:
    """A few words on what a stage produced, from its manifest summary."""
    def num(v: Any) -> str:
        return f"{v:,}" if isinstance(v, int) else str(v)

    try:
        if name == "generate":
            return f"{num(s['users'])} users, {num(s['ads'])} ads, {num(s['events'])} events"
        if name == "ingest":
            return f"events: {s['events']}"
        if name == "sids":
            return (f"{num(s['ads'])} ads -> S-IDs like {s['sid_example']}, "
                    f"collision rate {s['collision_rate']:.3f}")
        if name == "prompts":
            users = s["users"]["with_examples"] if isinstance(s["users"], dict) else s["users"]
            return (f"{num(users)} users, {num(sum(s['sft'].values()))} SFT examples, "
                    f"{num(sum(s['dpo'].values()))} DPO pairs")
        if name in ("sft", "dpo"):
            return f"{s['steps']} steps on {s['workers']}, train loss {s['train_loss']}"
        if name == "eval":
            ours = {m: v for m, v in s.items() if m.startswith("leadre") and isinstance(v, dict)}
            return f"{num(s['rows'])} test users scored" + "".join(
                f"; {m} HR@{SUMMARY_K} {v[f'hr@{SUMMARY_K}']:.4f}" for m, v in ours.items())
        if name == "index":
            return f"{s['mode']} over {num(s['ads'])} ads, recall@10 {s['recall_at_10']:.3f}"
        if name == "warm":
            return f"{num(s['contexts'])} user contexts in the candidate store"
        if name == "serve":
            return f"{s['url']}, {len(s['answers'])} users asked over HTTP"
    except (KeyError, TypeError, ValueError):
        pass
    return ""


# --------------------------------------------------------------------------- the summary


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and v == v else "-"


def metrics_table(metrics: dict[str, Any], k: int = SUMMARY_K) -> list[str]:
    """LEADRE (fused, then the beam alone) and the baselines side by side, with recall on
    cold and warm targets when the split held ads out (``metrics.json`` of the eval stage)."""
    cols = [f"hr@{k}", f"ndcg@{k}", f"coverage@{k}"]
    methods = metrics.get("methods", {})
    if not methods:
        return ["  (no methods were evaluated)"]
    width = max(12, *(len(n) for n in methods))
    head = "".join(f"{c.upper().replace('COVERAGE', 'coverage'):>13}" for c in cols)
    with_ci = any(isinstance(m.get(f"hr@{k}_ci"), list) for m in methods.values())
    head += f"{f'HR@{k} 95% CI':>18}" if with_ci else ""
    groups = [g for g in ("cold", "warm") if any(g in m for m in methods.values())]
    head += "".join(f"{f'{g} R@{k}':>12}" for g in groups)
    lines = [f"  {'method':<{width}}{head}"]
    for name, m in sorted(methods.items(), key=lambda nm: not nm[0].startswith("leadre")):
        ci = m.get(f"hr@{k}_ci") if with_ci else None
        lines.append(f"  {name:<{width}}" + "".join(f"{_fmt(m.get(c)):>13}" for c in cols)
                     + (f"{f'[{ci[0]:.3f}, {ci[1]:.3f}]':>18}" if isinstance(ci, list) else "")
                     + "".join(f"{_fmt((m.get(g) or {}).get(f'recall@{k}')):>12}"
                               for g in groups))
    if groups:
        cold = next(m["cold"]["targets"] for m in methods.values() if "cold" in m)
        lines.append(f"  cold: {cold} test users whose next ad was held out of all training "
                     "(ID-only SASRec cannot rank it: 0 by construction); -beam: the trie "
                     "beam alone, without the dense head")
    ch = metrics.get("channel")
    if ch:
        kk = ch["k"]
        gain, ci = ch[f"incremental_recall@{2 * kk}"], ch.get(f"incremental_recall@{2 * kk}_ci")
        lines.append(f"  channel: SASRec top {kk} + LEADRE top {kk} vs SASRec top {2 * kk}: "
                     f"recall@{2 * kk} {gain:+.4f}"
                     + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""))
    for name, d in (metrics.get("differences") or {}).items():
        hr, nd = d.get(f"hr@{k}"), d.get(f"ndcg@{k}")
        if hr and nd:
            lines.append(f"  {name}: HR@{k} {hr[0]:+.4f} [{hr[1]:+.3f}, {hr[2]:+.3f}], "
                         f"NDCG@{k} {nd[0]:+.4f} [{nd[1]:+.3f}, {nd[2]:+.3f}] (paired)")
    if "filter_history" in metrics:  # how the numbers were measured (eval's metrics.json)
        lines.append(f"  ({metrics['split']} split, users {metrics.get('users_hash')}, history "
                     f"{'' if metrics['filter_history'] else 'not '}filtered; CI: bootstrap "
                     "over users)")
    return lines


def recommendation_lines(answers: dict[str, Any], titles: dict[str, str],
                         per_user: int = 5, categories: dict[str, str] | None = None
                         ) -> list[str]:
    """A few users, their main interests, and the titles (and categories) of the ads the
    server recommended them."""
    lines: list[str] = []
    if "error" in answers:
        lines.append(f"  {answers['error']}")
    for user, a in answers.items():
        if not isinstance(a, dict):
            continue
        likes = ", ".join(a.get("interests") or []) or "?"
        lines.append(f"  {user}  interests: {likes}  (first call: {a['first_cache']}, "
                     f"later: {a['later_cache']})")
        sources = a.get("sources") or [""] * len(a["ads"])
        for i, (ad, src) in enumerate(zip(a["ads"][:per_user], sources), 1):
            title = titles.get(ad, "?")
            title = title if len(title) <= 50 else title[:47] + "..."
            cat = (categories or {}).get(ad)
            lines.append(f"     {i}. {title}  [{cat + ', ' if cat else ''}{ad}"
                         f"{', ' + src if src else ''}]")
    return lines or ["  (no users were asked)"]


def render_summary(*, metrics: dict[str, Any], answers: dict[str, Any],
                   titles: dict[str, str], root: str, outputs: list[str], eval_dir: str,
                   model_dir: str, logs: str, ray_logs: str | None, seconds: float,
                   serve_cmd: str, curl_cmd: str, plots: list[str] | None = None,
                   categories: dict[str, str] | None = None) -> str:
    """The human summary the demo ends with."""
    out = [f"Offline evaluation on {metrics.get('rows')} test users ({eval_dir}/metrics.json):",
           *metrics_table(metrics), "",
           "Recommendations over HTTP (first call: real-time ANN fallback; later: the LLM's "
           "candidates):",
           *recommendation_lines(answers, titles, categories=categories), "",
           "Artifacts:",
           f"  stage outputs  {root}/{{{','.join(outputs)}}}  (a manifest.json in each)",
           f"  eval report    {eval_dir}/report.md"]
    if plots:
        out.append("  plots          " + ", ".join(f"{eval_dir}/{p}" for p in plots))
    out += [f"  served model   {model_dir}/merged",
            f"  logs           {logs}/<stage>.log"
            + (f"; Ray workers: {ray_logs}" if ray_logs else ""), "",
            "Serve the model again and ask it yourself:",
            f"  {serve_cmd}", f"  {curl_cmd}", "",
            f"Done in {seconds / 60:.1f} min."]
    return "\n".join(out)


def _summary(cfg: DemoConfig, dirs: dict[str, str], served: dict[str, Any], plots: list[str],
             logs: Path, ray_logs: str | None, seconds: float) -> str:
    from leadre import artifacts

    metrics = artifacts.read_json(dirs["eval"], "metrics.json")
    ads = artifacts.read_table(dirs["ingest"], "ads").select(["ad_id", "title",
                                                              "category"]).to_pydict()
    answers = served.get("answers", {})
    user = next((u for u, a in answers.items() if isinstance(a, dict)), "<user_id>")
    # `make demo` runs .venv/bin/leadre, which need not be on the PATH
    exe = sys.argv[0] if Path(sys.argv[0]).name == "leadre" else "leadre"
    serve_cmd = (f"{exe} serve --index-dir {dirs['index']} --sids-dir {dirs['sids']} "
                 f"--model-dir {dirs['dpo']} --store-url {_store_url(cfg)} --port {cfg.port}")
    curl_cmd = (f"curl -s http://127.0.0.1:{cfg.port}/recommend -H 'Content-Type: "
                f"application/json' -d '{{\"user_id\": \"{user}\", \"k\": 5}}'")
    outputs = [Path(d).name for d in dirs.values() if os.path.isdir(d)]
    return render_summary(metrics=metrics, answers=answers,
                          titles=dict(zip(ads["ad_id"], ads["title"])), root=cfg.out,
                          outputs=outputs, eval_dir=dirs["eval"], model_dir=dirs["dpo"],
                          logs=str(logs), ray_logs=ray_logs, seconds=seconds,
                          serve_cmd=serve_cmd, curl_cmd=curl_cmd, plots=plots,
                          categories=dict(zip(ads["ad_id"], ads["category"])))


# --------------------------------------------------------------------------- the run


def run(cfg: DemoConfig) -> dict[str, Any]:
    import ray

    from leadre import artifacts
    if "://" not in cfg.out:  # Ray workers do not share the driver's working directory
        cfg.out = artifacts.resolve(cfg.out)[1]
    quiet = not cfg.verbose
    cfg.ray.quiet = cfg.ray.quiet or quiet
    logs = (Path(cfg.out) if "://" not in cfg.out
            else Path(tempfile.mkdtemp(prefix="leadre-demo-"))) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    console = Console(quiet)
    dirs = pipeline_dirs(cfg.out, PIPELINE)
    settings = _settings(cfg)
    console.print(f"LEADRE demo: {cfg.users:,} synthetic users, {cfg.ads:,} ads -> {cfg.out}")
    if quiet:
        console.print(f"(library logs: {logs}/<stage>.log; --verbose prints them here)")
    console.print()

    started_ray = not ray.is_initialized()
    summary: dict[str, Any] = {}
    plots: list[str] = []
    t_all = time.perf_counter()
    try:
        with console.output_to(logs / "demo.log"):
            init_ray(cfg.ray)
        ray_logs = link_ray_logs(logs)
        for i, name in enumerate(PIPELINE, 1):
            label = f"  [{i:>2}/{len(PIPELINE)}] {name:<9}"
            log_file = logs / f"{name}.log"
            try:
                with console.stage_line(label) as note, console.output_to(log_file):
                    if name == "serve":
                        manifest = _serve_and_query(cfg, dirs, settings["serve"])
                    else:
                        manifest = run_stage(name, wire(name, dirs, settings[name]))
                    summary[name] = manifest.get("summary", manifest.get("counts"))
                    note(_stage_note(name, summary[name] or {}))
            except BaseException:
                if quiet:
                    with open(log_file, "a") as f:
                        traceback.print_exc(file=f)
                    console.print(f"\n{name} failed; the end of {log_file}:\n{tail(log_file)}\n")
                raise
            if name == "eval":
                plots = [Path(p).name for p in manifest.get("plots", [])]
        text = _summary(cfg, dirs, summary["serve"], plots, logs, ray_logs,
                        time.perf_counter() - t_all)
        artifacts.write_text(cfg.out, "summary.txt", text + "\n")
        console.print()
        console.print(text)
    finally:
        if started_ray:
            with console.output_to(logs / "demo.log"):
                ray.shutdown()
        if quiet:
            console.term.close()
    summary["total_seconds"] = round(time.perf_counter() - t_all, 1)
    summary["artifacts"] = cfg.out
    return {"summary": summary}
