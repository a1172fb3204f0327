"""End-to-end HTTP benchmark of the two-tier graph on this machine.

Builds a synthetic world (ads, users, events -> S-IDs -> ScaNN index), writes every user's
context to the embedded store, starts Ray Serve on 127.0.0.1 and drives POST /recommend at a
fixed request rate for a fixed duration (open loop: requests are sent on schedule whether or
not earlier ones finished, from a bounded thread pool). Reports p50/p99 latency, the error
count and the cache-hit share (misses are answered by the real-time ScaNN fallback and queued
for the generator, which fills the cache while the load runs).

    .venv/bin/python bench/bench_serve.py [--rate 50] [--seconds 30] [--ads 5000] [--users 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _results import append  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=50.0, help="requests per second")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--ads", type=int, default=5000)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=16)
    args = ap.parse_args()

    from ray import serve

    from leadre.runtime import RayConfig, init_ray
    from leadre.serve import GeneratorConfig, IngressConfig, MatcherConfig, ServeConfig
    from leadre.serve.app import build
    from leadre.serve.context import user_contexts
    from leadre.serve.store import open_store
    from serving_world import make_world

    root = Path(tempfile.mkdtemp(prefix="leadre-bench-serve-"))
    t0 = time.time()
    w = make_world(root, ads=args.ads, users=args.users)
    store_url = f"sqlite:///{root / 'store.db'}"
    ctx = user_contexts(w["ingest"])
    with open_store(store_url) as s:
        s.put_users(ctx)
    print(f"world + sids + index + contexts: {time.time() - t0:.1f}s", flush=True)

    init_ray(RayConfig(num_cpus=2, object_store_mb=300))
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(ServeConfig(index_dir=w["index"], sids_dir=w["sids"], store_url=store_url,
                                ingress=IngressConfig(num_cpus=0.1),
                                matcher=MatcherConfig(num_cpus=0.1),
                                generator=GeneratorConfig(num_gpus=0))),
              name="leadre-bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    users = list(ctx)
    rng = np.random.default_rng(0)
    local = threading.local()
    lat, codes, cache = [], Counter(), Counter()
    lock = threading.Lock()

    def one(uid: str) -> None:
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = httpx.Client(base_url=base, timeout=10)
        t = time.perf_counter()
        try:
            r = c.post("/recommend", json={"user_id": uid, "k": 10})
            code = r.status_code
            kind = r.json().get("cache") if code == 200 else None
        except httpx.HTTPError:
            code, kind = "exception", None
        dt = time.perf_counter() - t
        with lock:
            lat.append(dt)
            codes[code] += 1
            if kind:
                cache[kind] += 1

    for u in users[:20]:  # warm the connection pool and code paths
        one(u)
    lat.clear(), codes.clear(), cache.clear()
    n = int(args.rate * args.seconds)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as ex:
        for i in range(n):
            due = start + i / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            ex.submit(one, users[int(rng.zipf(1.3)) % len(users)])
    wall = time.perf_counter() - start
    serve.shutdown()
    ms = np.asarray(lat) * 1000
    errors = sum(v for k, v in codes.items() if k != 200)
    body = (f"| rate req/s | duration s | requests | p50 ms | p99 ms | max ms | errors | "
            f"cache hit share |\n|---|---|---|---|---|---|---|---|\n"
            f"| {args.rate:g} | {wall:.1f} | {len(ms)} | {np.percentile(ms, 50):.1f} | "
            f"{np.percentile(ms, 99):.1f} | {ms.max():.1f} | {errors} | "
            f"{cache['hit'] / max(1, sum(cache.values())):.2f} |\n\n"
            f"{args.ads} ads, {args.users} users (Zipf-distributed requests), 1 replica per "
            f"tier, embedding-baseline generator filling the cache during the run, SQLite "
            f"store; client and server share the 2 cores. Status codes: {dict(codes)}.")
    append("Serving: end-to-end HTTP POST /recommend at a fixed rate", body)


if __name__ == "__main__":
    main()
