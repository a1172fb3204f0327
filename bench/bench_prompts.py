"""Stage 3 throughput: examples/s of `leadre prompts` on the synthetic world, Ray Data on 1 and
2 CPUs, against the single-process pure-Python run of the same builder, in one run.

    python bench/bench_prompts.py [--users 100000] [--ads 10000]

The world is generated with leadre.data.synth and written directly as an ingest directory (the
generator's tables are already clean, so the ingest stage is not part of what is measured).
S-IDs come from a random 4-level table (first level = ad category, 256 codes per level, plus
the disambiguation level), built in a second: only its shape matters for prompt building.
Examples = SFT rows + DPO pairs; every run reads the inputs and writes all parquet outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _results import append  # noqa: E402

from leadre import artifacts  # noqa: E402
from leadre.prompts import PromptConfig, build_local, run  # noqa: E402
from leadre.runtime import RayConfig, init_ray  # noqa: E402
from leadre.sids.table import SidTable  # noqa: E402
from leadre.data import shards  # noqa: E402
from leadre.data.ingest import IngestConfig  # noqa: E402
from leadre.data.synth import SynthConfig, generate, write_world  # noqa: E402


def make_inputs(root: str, users: int, ads: int, seed: int) -> tuple[str, str, int]:
    cfg = SynthConfig(out=f"{root}/ingest", users=users, ads=ads, seed=seed)
    world = generate(cfg)
    write_world(world, cfg)
    # The layout `leadre ingest` writes: user shards of ~100k events, sorted by user and time.
    n_shards = shards.default_shards(world.events.num_rows, IngestConfig().batch_size)
    shards.write_partitioned(world.events, world.users, cfg.out, n_shards)
    artifacts.write_manifest(cfg.out, "ingest", inputs={"source": "parquet", "note": "bench"},
                             config=cfg, counts={}, timings={},
                             extra={shards.LAYOUT_KEY: shards.layout(n_shards)})
    rng = np.random.default_rng(seed)
    codes = np.stack([world.ad_category, *(rng.integers(0, 256, ads) for _ in range(3))], 1)
    table = SidTable.from_codes(world.ads.column("ad_id").to_pylist(), codes,
                                [len(world.categories), 256, 256, 256],
                                world.ads.column("active").to_pylist(), version="bench")
    table.save(f"{root}/sids")
    artifacts.write_manifest(f"{root}/sids", "sids", inputs={}, config={}, counts={},
                             timings={}, extra={"version": "bench"})
    return cfg.out, f"{root}/sids", world.events.num_rows


def timed_run(fn, cfg) -> tuple[float, dict]:
    t0 = time.perf_counter()
    m = fn(cfg)
    return time.perf_counter() - t0, m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--ads", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="Ray CPU counts to run")
    p.add_argument("--skip-local", action="store_true", help="skip the pure-Python run")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-prompts-") as root:
        t0 = time.perf_counter()
        ingest, sids, n_events = make_inputs(root, args.users, args.ads, args.seed)
        prep = time.perf_counter() - t0
        results = []
        base = dict(ingest_dir=ingest, sids_dir=sids)
        if not args.skip_local:
            s, m = timed_run(build_local, PromptConfig(**base, out=f"{root}/local"))
            results.append(("pure Python, 1 process", s, m))
            print(f"local: {s:.1f} s", m["summary"], flush=True)
        for cpus in args.cpus:
            ray_cfg = RayConfig(num_cpus=cpus, object_store_mb=1024)
            init_ray(ray_cfg)
            try:
                s, m = timed_run(run, PromptConfig(**base, out=f"{root}/ray{cpus}", ray=ray_cfg))
            finally:
                ray.shutdown()
            results.append((f"Ray Data, {cpus} CPU", s, m))
            print(f"ray {cpus} cpu: {s:.1f} s", m["summary"], flush=True)

    def rate(s, m):
        return m["counts"]["totals"]["examples"] / s

    c = results[0][2]["counts"]
    rows = "\n".join(
        f"| {name} | {s:.1f} | {m['counts']['totals']['examples']:,} | {rate(s, m):,.0f} | "
        f"{m['counts']['users']['total'] / s:,.0f} |" for name, s, m in results)
    by = {name: rate(s, m) for name, s, m in results}
    ratios = []
    r1, r2 = by.get("Ray Data, 1 CPU"), by.get("Ray Data, 2 CPU")
    py = by.get("pure Python, 1 process")
    if r1 and r2:
        ratios.append(f"scaling 1 -> 2 CPUs: **{r2 / r1:.2f}x**")
    if py and r2:
        ratios.append(f"Ray Data 2 CPUs vs pure Python: **{r2 / py:.2f}x**")
    if py and r1:
        ratios.append(f"Ray Data 1 CPU vs pure Python: {r1 / py:.2f}x")
    load = os.getloadavg()
    body = f"""{args.users:,} users, {args.ads:,} ads, {n_events:,} events (inputs prepared in {prep:.1f} s,
not counted). Examples = SFT rows + DPO pairs; {c['totals']['sft']:,} SFT
({c['sft']['train']['main']:,} main train), {c['totals']['dpo']:,} DPO, {c['totals']['eval']:,} eval rows.
Wall time from reading inputs to the last parquet shard (Ray start-up excluded).

| engine | wall s | examples | examples/s | users/s |
|---|---|---|---|---|
{rows}

{'; '.join(ratios)}. Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}
(shared machine: other jobs compete for the same 2 cores)."""
    append("Prompt pipeline (stage 3)", body)


if __name__ == "__main__":
    main()
