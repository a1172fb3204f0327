"""`leadre demo`: the whole pipeline on the embedded synthetic world, stage by stage, each
stage writing its artifact directory under ``out`` exactly as the stand-alone commands do."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from leadre.runtime import RayConfig, init_ray


@dataclass
class DemoConfig:
    """Size of the demo world and where its artifacts go."""

    out: str = field(default="runs/demo", metadata={"help": "directory for all stage outputs"})
    users: int = field(default=2000, metadata={"help": "synthetic users"})
    ads: int = field(default=500, metadata={"help": "synthetic ads"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    corrupt_share: float = field(default=0.002, metadata={
        "help": "share of malformed log rows injected to show the ingest quarantine at work"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray connection"})


def _stages(cfg: DemoConfig) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    from leadre import ingest, synth

    world, ingested = f"{cfg.out}/world", f"{cfg.out}/ingest"
    return [
        ("generate", lambda: synth.run(synth.SynthConfig(
            out=world, users=cfg.users, ads=cfg.ads, seed=cfg.seed,
            corrupt_share=cfg.corrupt_share))),
        ("ingest", lambda: ingest.run(ingest.IngestConfig(input=world, out=ingested,
                                                          ray=cfg.ray))),
    ]


def run(cfg: DemoConfig) -> dict[str, Any]:
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
