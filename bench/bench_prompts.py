"""Stage 3 throughput: examples/s of `leadre prompts` on the synthetic world, Ray Data
(engine=shards) on 1 and 2 CPUs, against the single-process pure-Python per-user loop
(`build_local`, the old builder), in one run, with the peak memory of each.

    python bench/bench_prompts.py [--users 100000] [--ads 10000] [--groupby 2] [--pin]

The last line is `RESULT examples=<n> python_eps=<x> ray1_eps=<x> ray2_eps=<x>` plus the
peak memory of each run (`<run>_peak_mib`) and `pinned=0|1` (`--pin`). `--groupby 2` also runs the old Ray engine
(shuffle by user, one Python call per user) on 2 CPUs, for comparison.

The world is generated with leadre.data.synth and written directly as an ingest directory (the
generator's tables are already clean, so the ingest stage is not part of what is measured), in
the user-shard layout `leadre ingest` writes (`leadre.data.shards`).
S-IDs come from a random 4-level table (first level = ad category, 256 codes per level, plus
the disambiguation level), built in a second: only its shape matters for prompt building.
Examples = SFT rows + DPO pairs; every run reads the inputs and writes all parquet outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from _results import append  # noqa: E402

from leadre import artifacts  # noqa: E402
from leadre.prompts import PromptConfig, build_local, run  # noqa: E402
from leadre.runtime import RayConfig, init_ray  # noqa: E402
from leadre.sids.table import SidTable  # noqa: E402
from leadre.data import shards  # noqa: E402
from leadre.data.config import IngestConfig  # noqa: E402
from leadre.data.config import SynthConfig  # noqa: E402
from leadre.data.synth import generate, write_world  # noqa: E402


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


class PeakRss:
    """Peak of the summed RSS of this process and all its descendants (the Ray driver, raylet,
    GCS and workers of a local cluster), sampled every 0.25 s in a thread (a sample costs ~2
    ms of CPU; at 0.1 s that took 2% of a core from the run). Pages shared between
    processes (the object store) are counted once per process that maps them."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, self._sample())

    def __enter__(self) -> "PeakRss":
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def timed_run(fn, cfg) -> tuple[float, dict, int]:
    """(wall seconds, manifest, peak RSS bytes over the process tree) of one stage run."""
    with PeakRss() as mem:
        t0 = time.perf_counter()
        m = fn(cfg)
        seconds = time.perf_counter() - t0
    return seconds, m, mem.peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--ads", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="Ray CPU counts to run")
    p.add_argument("--skip-local", action="store_true", help="skip the pure-Python run")
    p.add_argument("--groupby", type=int, nargs="*", default=[], metavar="CPUS",
                   help="also run the old engine (engine=groupby: shuffle by user, one Python "
                        "call per user) on these CPU counts, for its time and peak memory")
    p.add_argument("--pin", action="store_true",
                   help="pin each run, with every process it starts (Ray's raylet, GCS, "
                        "dashboard, workers), to as many cores as it has CPUs (the Python run "
                        "to one): without it, a 1-CPU Ray run has its control plane on the "
                        "other core for free, and 2 CPUs share theirs")
    args = p.parse_args()
    all_cores = os.sched_getaffinity(0)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-prompts-") as root:
        t0 = time.perf_counter()
        ingest, sids, n_events = make_inputs(root, args.users, args.ads, args.seed)
        prep = time.perf_counter() - t0
        n_shards = len(shards.shard_ids(ingest))
        results = []
        base = dict(ingest_dir=ingest, sids_dir=sids)
        def pin(cpus: int | None) -> None:
            os.sched_setaffinity(0, sorted(all_cores)[:cpus] if cpus else all_cores)

        if not args.skip_local:
            pin(1 if args.pin else None)
            s, m, peak = timed_run(build_local, PromptConfig(**base, out=f"{root}/local"))
            results.append(("pure Python, 1 process (per-user loop)", "python", s, m, peak))
            print(f"local: {s:.1f} s", m["summary"], flush=True)
        runs = [(c, "groupby") for c in args.groupby] + [(c, "shards") for c in args.cpus]
        for cpus, engine in runs:
            ray_cfg = RayConfig(num_cpus=cpus, object_store_mb=1024)
            pin(cpus if args.pin else None)  # before Ray starts: its processes inherit it
            init_ray(ray_cfg)
            try:
                s, m, peak = timed_run(run, PromptConfig(**base, out=f"{root}/{engine}{cpus}",
                                                         ray=ray_cfg, engine=engine))
            finally:
                ray.shutdown()
                pin(None)
            old = engine == "groupby"
            name = f"Ray Data, {cpus} CPU, " + ("old engine=groupby" if old else "engine=shards")
            results.append((name, f"{'groupby' if old else 'ray'}{cpus}", s, m, peak))
            print(f"{name}: {s:.1f} s", m["summary"], flush=True)

    def rate(s, m):
        return m["counts"]["totals"]["examples"] / s

    c = results[0][3]["counts"]
    def usage(m):
        u = m.get("shard_workers")
        if not u or not u.get("workers"):
            return ""
        return (f"{u['workers']} x {u['busy_share']:.0%} of {u['span_s']:.1f} s; shard "
                f"{u['shard_s']['median']:.2f} s (max {u['shard_s']['max']:.2f})")

    rows = "\n".join(
        f"| {name} | {s:.1f} | {m['counts']['totals']['examples']:,} | {rate(s, m):,.0f} | "
        f"{m['counts']['users']['total'] / s:,.0f} | {peak / 2**20:,.0f} | {usage(m)} |"
        for name, _, s, m, peak in results)
    by = {key: rate(s, m) for _, key, s, m, _ in results}
    peaks = {key: peak for _, key, _, _, peak in results}
    ratios = []
    r1, r2, py = by.get("ray1"), by.get("ray2"), by.get("python")
    if r1 and r2:
        ratios.append(f"scaling 1 -> 2 CPUs: **{r2 / r1:.2f}x**")
    if py and r2:
        ratios.append(f"Ray Data 2 CPUs vs pure Python: **{r2 / py:.2f}x**")
    if py and r1:
        ratios.append(f"Ray Data 1 CPU vs pure Python: {r1 / py:.2f}x")
    load = os.getloadavg()
    pinned = ("Each run pinned (`--pin`) with all its processes to as many cores as it has "
              "CPUs (pure Python: 1 core).\n" if args.pin else "")
    body = f"""{pinned}{args.users:,} users, {args.ads:,} ads, {n_events:,} events in {n_shards} user shards
(inputs prepared in {prep:.1f} s, not counted). Examples = SFT rows + DPO pairs; {c['totals']['sft']:,} SFT
({c['sft']['train']['main']:,} main train), {c['totals']['dpo']:,} DPO, {c['totals']['eval']:,} eval rows.
Wall time from reading inputs to the last parquet shard (Ray start-up excluded). Peak memory:
summed RSS of the driver and every process it started (Ray's raylet, GCS, workers), sampled
every 0.25 s during the run (object-store pages count once per process mapping them).
Builders busy: ShardBuilder actors x the share of the build span each spent inside a shard.

| engine | wall s | examples | examples/s | users/s | peak RSS MiB | builders busy |
|---|---|---|---|---|---|---|
{rows}

{'; '.join(ratios)}. Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}
(shared machine: other jobs compete for the same cores)."""
    append("Prompt pipeline (stage 3)", body)
    keys = " ".join(f"{k}_eps={by[k]:.0f}" for k in ("python", "ray1", "ray2") if k in by)
    mem = " ".join(f"{k}_peak_mib={peaks[k] / 2**20:.0f}" for k in peaks)
    print(f"RESULT examples={c['totals']['examples']} {keys} {mem} pinned={int(args.pin)}")


if __name__ == "__main__":
    main()
