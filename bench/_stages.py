"""Running pipeline stages from a benchmark: a stage whose manifest exists is done (an
interrupted benchmark resumes), and each run prints how long it took."""

from __future__ import annotations

import time
from pathlib import Path


def done(d: Path) -> bool:
    return (d / "manifest.json").exists()


def run(name: str, cfg) -> dict:
    from leadre.stages import run_stage

    t0 = time.time()
    m = run_stage(name, cfg)
    print(f"  {name} -> {cfg.out} in {time.time() - t0:.0f} s", flush=True)
    return m
