"""`leadre demo`: the whole pipeline on the embedded synthetic world, stage by stage, each
stage writing its artifact directory under ``out`` exactly as the stand-alone commands do:

    generate -> ingest -> sids -> prompts -> sft -> dpo -> eval -> index -> warm -> serve (+ HTTP)

Sizes are chosen to finish in about ten minutes on a 2-core CPU machine; every knob of every
stage stays reachable through that stage's own command.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable

from leadre.runtime import RayConfig, init_ray


@dataclass
class DemoConfig:
    """Size of the demo world, training budget, and where the artifacts go."""

    out: str = field(default="runs/demo", metadata={"help": "directory for all stage outputs"})
    users: int = field(default=2000, metadata={"help": "synthetic users"})
    ads: int = field(default=500, metadata={"help": "synthetic ads"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    corrupt_share: float = field(default=0.002, metadata={
        "help": "share of malformed log rows injected to show the ingest quarantine at work"})
    preset: str = field(default="tiny", metadata={
        "help": "model preset built from scratch (tiny | small)"})
    workers: int = field(default=2, metadata={"help": "Ray Train workers for SFT and DPO"})
    sft_steps: int = field(default=300, metadata={"help": "SFT optimiser steps"})
    dpo_steps: int = field(default=60, metadata={"help": "DPO optimiser steps"})
    eval_rows: int = field(default=300, metadata={"help": "test users scored by the evaluator"})
    beam_size: int = field(default=10, metadata={"help": "beam width of constrained decoding"})
    port: int = field(default=8000, metadata={"help": "HTTP port of the demo's Serve app"})
    requests: int = field(default=3, metadata={"help": "users to query over HTTP at the end"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray connection"})


def _stages(cfg: DemoConfig) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    from leadre import ingest, synth

    d = {name: f"{cfg.out}/{name}" for name in
         ("world", "ingest", "sids", "prompts", "sft", "dpo", "eval", "index")}

    def sids() -> dict[str, Any]:
        from leadre.sids import SidConfig, run
        return run(SidConfig(ingest_dir=d["ingest"], out=d["sids"], seed=cfg.seed,
                             quantizer="rqkmeans", ray=cfg.ray))

    def prompts() -> dict[str, Any]:
        from leadre.prompts import PromptConfig, run
        return run(PromptConfig(ingest_dir=d["ingest"], sids_dir=d["sids"], out=d["prompts"],
                                seed=cfg.seed, ray=cfg.ray))

    def sft() -> dict[str, Any]:
        from leadre.sft import SftConfig, run
        return run(SftConfig(prompts=d["prompts"], out=d["sft"], preset=cfg.preset,
                             num_workers=cfg.workers, max_steps=cfg.sft_steps,
                             seed=cfg.seed, ray=cfg.ray))

    def dpo() -> dict[str, Any]:
        from leadre.dpo import DpoConfig, run
        return run(DpoConfig(prompts=d["prompts"], sft=d["sft"], out=d["dpo"],
                             num_workers=cfg.workers, max_steps=cfg.dpo_steps,
                             seed=cfg.seed, ray=cfg.ray))

    def evaluate() -> dict[str, Any]:
        from leadre.evaluate import EvalConfig, run
        return run(EvalConfig(prompts_dir=d["prompts"], model_dir=d["dpo"], sids_dir=d["sids"],
                              ingest_dir=d["ingest"], out=d["eval"], max_rows=cfg.eval_rows,
                              beam_size=cfg.beam_size, seed=cfg.seed, ray=cfg.ray))

    def index() -> dict[str, Any]:
        from leadre.index import IndexConfig, run
        return run(IndexConfig(sids_dir=d["sids"], ingest_dir=d["ingest"], out=d["index"],
                               seed=cfg.seed))

    def warm() -> dict[str, Any]:
        # Contexts only: the serving generator fills candidates asynchronously on first
        # request, which is what the demo shows. A production warm-up also generates.
        from leadre.serve.warm import WarmConfig, run
        return run(WarmConfig(ingest_dir=d["ingest"], sids_dir=d["sids"], index_dir=d["index"],
                              model_dir=d["dpo"], store_url=_store_url(cfg),
                              contexts_only=True, ray=cfg.ray))

    def serve() -> dict[str, Any]:
        return _serve_and_query(cfg, d)

    return [
        ("generate", lambda: synth.run(synth.SynthConfig(
            out=d["world"], users=cfg.users, ads=cfg.ads, seed=cfg.seed,
            corrupt_share=cfg.corrupt_share))),
        ("ingest", lambda: ingest.run(ingest.IngestConfig(input=d["world"], out=d["ingest"],
                                                          ray=cfg.ray))),
        ("sids", sids), ("prompts", prompts), ("sft", sft), ("dpo", dpo), ("eval", evaluate),
        ("index", index), ("warm", warm), ("serve", serve),
    ]


def _store_url(cfg: DemoConfig) -> str:
    from leadre import artifacts
    return f"sqlite:///{artifacts.resolve(cfg.out)[1]}/store.db"


def _post(url: str, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _serve_and_query(cfg: DemoConfig, d: dict[str, str]) -> dict[str, Any]:
    """Deploy the two-tier graph on the DPO model, then ask for a few users twice: the first
    answer comes from the real-time ANN fallback (cache miss, generation queued), the second
    from the LLM's generated candidates once the generator has filled the store."""
    from ray import serve

    from leadre import artifacts
    from leadre.serve import ServeConfig, run

    served = run(ServeConfig(index_dir=d["index"], sids_dir=d["sids"], model_dir=d["dpo"],
                             store_url=_store_url(cfg),
                             port=cfg.port, blocking=False, ray=cfg.ray))
    url = served["summary"]["recommend"]
    users = artifacts.read_table(d["prompts"], "eval/test").column("user_id").to_pylist()
    answers: dict[str, Any] = {}
    try:
        for user in users[: cfg.requests]:
            first = _post(url, {"user_id": user, "k": 5})
            print(f"  {user} (1st call): cache={first['cache']} "
                  f"sources={[a['source'] for a in first['ads']]}", flush=True)
            second = first
            deadline = time.time() + 60
            while second["cache"] != "hit" and time.time() < deadline:
                time.sleep(2)
                second = _post(url, {"user_id": user, "k": 5})
            print(f"  {user} (later):    cache={second['cache']} ads="
                  f"{[(a['ad_id'], a['source'], round(a['score'], 3)) for a in second['ads']]}",
                  flush=True)
            answers[user] = {"first": first, "later": second}
    except (urllib.error.URLError, OSError) as e:
        answers["error"] = f"HTTP request failed: {e}"
    finally:
        serve.shutdown()
    return {"summary": {"url": url, "answers": {
        u: {"first_cache": a["first"]["cache"], "later_cache": a["later"]["cache"],
            "ads": [x["ad_id"] for x in a["later"]["ads"]]} if isinstance(a, dict) else a
        for u, a in answers.items()}}}


def run(cfg: DemoConfig) -> dict[str, Any]:
    from leadre import artifacts
    if "://" not in cfg.out:  # Ray workers do not share the driver's working directory
        cfg.out = artifacts.resolve(cfg.out)[1]
    init_ray(cfg.ray)
    stages = _stages(cfg)
    summary: dict[str, Any] = {}
    t_all = time.perf_counter()
    for i, (name, step) in enumerate(stages, 1):
        print(f"\n=== [{i}/{len(stages)}] {name} ===", flush=True)
        t0 = time.perf_counter()
        manifest = step()
        summary[name] = manifest.get("summary", manifest.get("counts"))
        print(f"=== [{i}/{len(stages)}] {name} done in {time.perf_counter() - t0:.1f}s ===",
              flush=True)
    summary["total_seconds"] = round(time.perf_counter() - t_all, 1)
    summary["artifacts"] = cfg.out
    return {"summary": summary}
