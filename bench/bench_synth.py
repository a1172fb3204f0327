"""Synthetic world generator throughput (target: 100k users x 10k ads in about a minute or
less on a 2-core machine) and the strength of its latent signal.

    python bench/bench_synth.py [--users 100000] [--ads 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).parent))
from _results import append  # noqa: E402

from leadre.data.config import SynthConfig  # noqa: E402
from leadre.data.synth import generate, write_world  # noqa: E402


def signal(world) -> dict[str, float]:
    ev = world.events.filter(pc.equal(world.events.column("action"), "click"))
    users = np.array([int(u[1:]) for u in ev.column("user_id").to_pylist()])
    cats = world.ad_category[np.array([int(a[2:]) for a in ev.column("ad_id").to_pylist()])]
    top3 = np.argsort(-world.interests, axis=1)[:, :3]
    share = float(np.mean((top3[users] == cats[:, None]).any(1)))
    return {"click_share_in_top3_latent": share, "chance": 3 / len(world.categories)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--ads", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    gen, write = [], []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            cfg = SynthConfig(out=d, users=args.users, ads=args.ads, seed=i)
            t0 = time.perf_counter()
            world = generate(cfg)
            t1 = time.perf_counter()
            write_world(world, cfg)
            t2 = time.perf_counter()
            size = sum(f.stat().st_size for f in Path(d).rglob("*.parquet"))
        gen.append(t1 - t0)
        write.append(t2 - t1)
    rows = world.events.num_rows
    s = signal(world)
    body = f"""| users | ads | events | generate s (median of {args.repeats}) | write parquet s | total s | events/s | parquet MB |
|---|---|---|---|---|---|---|---|
| {args.users:,} | {args.ads:,} | {rows:,} | {np.median(gen):.2f} | {np.median(write):.2f} | {np.median(gen) + np.median(write):.2f} | {rows / np.median(gen):,.0f} | {size / 2**20:.0f} |

Signal: share of clicks in the user's top-3 latent categories = {s['click_share_in_top3_latent']:.3f} (chance {s['chance']:.3f}, {s['click_share_in_top3_latent'] / s['chance']:.1f}x)."""
    append("Synthetic world generator", body)


if __name__ == "__main__":
    main()
