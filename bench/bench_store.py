"""Candidate-store bytes per user, measured: real ``CandidateRecord`` s (top-20 S-IDs of the
production shape, 4 x 256 codes + a disambiguation level, beam scores, versions, expiry) and
real user contexts (``contexts_from_frames`` over a synthetic world's events, at most 50 events
each, as ``leadre warm`` writes them) written through the store's own backends into

- SQLite (``sqlite:///``): file size growth per user (page_count x page_size, after the writes);
- a real ``redis-server`` (started here on 127.0.0.1, no persistence): ``MEMORY USAGE`` of every
  key (SAMPLES 0: exact), and ``used_memory`` growth per user (keys + Redis' own dict overhead).

Appends to bench/RESULTS.md. docs/capacity.md sizes the Redis cluster from it.

    python bench/bench_store.py [--users 20000] [--top-k 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._results import append  # noqa: E402
from leadre.data.config import SynthConfig  # noqa: E402
from leadre.data.synth import generate  # noqa: E402
from leadre.index.context import contexts_from_frames  # noqa: E402
from leadre.serve.store import CandidateRecord, open_store  # noqa: E402
from leadre.sids.table import SidTable  # noqa: E402


def catalog(n_ads: int, seed: int = 0) -> SidTable:
    """4 levels x 256 codes (the paper's shape), skewed like a real quantiser's output."""
    rng = np.random.default_rng(seed)
    codes = np.stack([np.minimum(rng.zipf(1.3, n_ads), 256) - 1 for _ in range(4)], axis=1)
    codes[:, 1:] = rng.integers(0, 256, size=(n_ads, 3))  # deeper levels spread out
    return SidTable.from_codes([f"ad{i:07d}" for i in range(n_ads)], codes, [256] * 4)


def records(users: list[str], table: SidTable, top_k: int, seed: int = 0
            ) -> list[CandidateRecord]:
    rng = np.random.default_rng(seed)
    sids = table.sid_array if hasattr(table, "sid_array") else [table.sid(a) for a in
                                                                 table.ad_id_array]
    now = time.time()
    out = []
    for u in users:
        pick = rng.choice(len(sids), size=top_k, replace=False)
        scores = np.sort(rng.normal(-6.0, 2.0, size=top_k))[::-1]  # beam log-probs, best first
        out.append(CandidateRecord(u, [str(sids[i]) for i in pick], [float(s) for s in scores],
                                   "dpo-3f9a1c22be", table.version or "83a65ab1b168", now,
                                   basis_ts=now - float(rng.integers(0, 86400))))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sqlite_bytes(path: Path) -> int:
    import sqlite3

    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA page_count").fetchone()[0] * \
            db.execute("PRAGMA page_size").fetchone()[0]


def measure_sqlite(root: Path, recs, contexts) -> dict:
    path = root / "store.db"
    store = open_store(f"sqlite:///{path}")
    base = sqlite_bytes(path)
    store.put_users(contexts)
    after_ctx = sqlite_bytes(path)
    store.put_many(recs, ttl_s=86400)
    after_cand = sqlite_bytes(path)
    reads = read_cost(store, recs)
    store.close()
    n = len(recs)
    return {"context": (after_ctx - base) / n, "candidates": (after_cand - after_ctx) / n,
            "total": (after_cand - base) / n, "reads": reads}


def measure_redis(root: Path, recs, contexts) -> dict:
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not installed: run scripts/install_redis.sh")
    port = free_port()
    proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        r = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        version = r.info("server")["redis_version"]
        store = open_store(f"redis://127.0.0.1:{port}/0")
        used0 = r.info("memory")["used_memory"]
        store.put_users(contexts)
        used1 = r.info("memory")["used_memory"]
        store.put_many(recs, ttl_s=86400)
        used2 = r.info("memory")["used_memory"]
        n = len(recs)

        def usage(kind: str) -> list[int]:
            keys = [f"leadre:{kind}:{rec.user_id}" for rec in recs]
            with r.pipeline(transaction=False) as p:
                for k in keys:
                    p.memory_usage(k, samples=0)
                return [int(x) for x in p.execute()]

        cand, ctx = usage("cand"), usage("user")
        reads = read_cost(store, recs, lambda: _redis_cpu(r))
        cand_json = [len(rec.to_json()) for rec in recs]
        ctx_json = [len(json.dumps(contexts[rec.user_id], separators=(",", ":"), default=str))
                    for rec in recs]
        store.close()
        return {"version": version, "reads": reads,
                "cand_usage": statistics.mean(cand), "cand_p99": float(np.percentile(cand, 99)),
                "ctx_usage": statistics.mean(ctx), "ctx_p99": float(np.percentile(ctx, 99)),
                "cand_json": statistics.mean(cand_json), "ctx_json": statistics.mean(ctx_json),
                "used_ctx": (used1 - used0) / n, "used_cand": (used2 - used1) / n,
                "used_total": (used2 - used0) / n}
    finally:
        proc.terminate()
        proc.wait(10)


def _redis_cpu(r) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def read_cost(store, recs, server_cpu=None, n: int = 5000, seed: int = 1) -> dict:
    """What the matcher's request path costs the store: one ``get`` (candidates) per request,
    plus one ``get_user`` (context) on a miss; one call at a time, as a replica's store
    thread makes them. Client CPU (this process), wall latency, and the server's CPU per read
    (``INFO cpu``) where there is a server."""
    rng = np.random.default_rng(seed)
    users = [recs[i].user_id for i in rng.integers(0, len(recs), size=n)]
    out = {}
    for what, call in (("get", store.get), ("get_user", store.get_user)):
        for u in users[:200]:  # warm-up: connections, caches
            call(u)
        lat = []
        s0 = server_cpu() if server_cpu else 0.0
        c0 = time.process_time()
        for u in users:
            t = time.perf_counter()
            assert call(u) is not None
            lat.append(time.perf_counter() - t)
        client = (time.process_time() - c0) / n
        server = (server_cpu() - s0) / n if server_cpu else None
        out[what] = {"client_us": client * 1e6, "server_us": None if server is None
                     else server * 1e6, "p50_us": float(np.percentile(lat, 50)) * 1e6,
                     "p99_us": float(np.percentile(lat, 99)) * 1e6}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--ads", type=int, default=20_000)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--max-events", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    world = generate(SynthConfig(users=a.users, ads=min(a.ads, 10_000), seed=a.seed))
    contexts = contexts_from_frames(world.users.to_pandas(), world.events.to_pandas(),
                                    world.ads.select(["ad_id", "category"]).to_pandas(),
                                    max_events=a.max_events)
    users = sorted(contexts)
    n_events = [len(contexts[u]["events"]) for u in users]
    table = catalog(a.ads, a.seed)
    recs = records(users, table, a.top_k, a.seed)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        sq = measure_sqlite(Path(tmp), recs, contexts)
        rd = measure_redis(Path(tmp), recs, contexts)

    sid_len = statistics.mean(len(s) for rec in recs[:1000] for s in rec.sids)
    zc = statistics.mean(len(zlib.compress(rec.to_json().encode(), 6)) for rec in recs)
    zx = statistics.mean(len(zlib.compress(json.dumps(contexts[rec.user_id], separators=(
        ",", ":"), default=str).encode(), 6)) for rec in recs)

    def row(name: str, m: dict) -> str:
        def f(x):
            return "-" if x is None else f"{x:.1f}"
        return (f"| {name} | {f(m['get']['client_us'])} / {f(m['get']['server_us'])} | "
                f"{m['get']['p50_us']:.0f} / {m['get']['p99_us']:.0f} | "
                f"{f(m['get_user']['client_us'])} / {f(m['get_user']['server_us'])} | "
                f"{m['get_user']['p50_us']:.0f} / {m['get_user']['p99_us']:.0f} |")
    body = f"""
{len(users):,} users of a synthetic world (`SynthConfig(users={a.users})`), contexts of at most
{a.max_events} events (mean {statistics.mean(n_events):.1f}, max {max(n_events)}: titles, actions,
ad ids, timestamps, profile, top categories), as `leadre warm` writes them; candidate records of
top-{a.top_k} S-IDs over {a.ads:,} ads of the production shape (4 x 256 codes + disambiguation,
mean {sid_len:.1f} characters per S-ID) with beam scores, model / S-ID versions, created /
expires / basis timestamps. Written through `leadre.serve.store` (`put_users`, `put_many`).

| store | candidates B/user | context B/user | total B/user |
|---|---|---|---|
| JSON payload (what either backend stores) | {rd['cand_json']:.0f} | {rd['ctx_json']:.0f} | {rd['cand_json'] + rd['ctx_json']:.0f} |
| Redis {rd['version']}, `MEMORY USAGE key SAMPLES 0` (mean; p99) | {rd['cand_usage']:.0f} ({rd['cand_p99']:.0f}) | {rd['ctx_usage']:.0f} ({rd['ctx_p99']:.0f}) | {rd['cand_usage'] + rd['ctx_usage']:.0f} |
| Redis, `used_memory` growth / users (keys + the keyspace's dict and expiry entries) | {rd['used_cand']:.0f} | {rd['used_ctx']:.0f} | {rd['used_total']:.0f} |
| SQLite file growth / users (`page_count x page_size`) | {sq['candidates']:.0f} | {sq['context']:.0f} | {sq['total']:.0f} |
| (not stored so) zlib level 6 of each JSON payload, for comparison | {zc:.0f} | {zx:.0f} | {zc + zx:.0f} |

Reads as the matcher makes them (one call at a time, {5000:,} random users; client and server
on the same 2 cores): `get` = a request's candidate read, `get_user` = the context read a miss
adds. CPU microseconds per read (client = this process, server = `INFO cpu` of redis-server)
and wall latency.

| store | get CPU us client / server | get p50 / p99 us | get_user CPU us client / server | get_user p50 / p99 us |
|---|---|---|---|---|
{row("Redis " + rd["version"] + " (TCP, 127.0.0.1)", rd["reads"])}
{row("SQLite (in-process)", sq["reads"])}
"""
    append("Candidate store: bytes per user (SQLite and Redis)", body)


if __name__ == "__main__":
    main()
