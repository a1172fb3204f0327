"""How long a model rollout takes: from the admin call that names a new model until 95% of the
active users hold candidates of that model, at the generator rate measured on this machine.

On the demo's artifacts (run `make demo` first): every active user gets candidates of the SFT
model (that pass measures the generator's rate), then the DPO model is rolled out exactly as
the Generator deployment does it (``GeneratorCore.swap_model``, the users still holding the
old model's candidates queued ahead of the rest, the queue drained in batches of
``generation.batch_size``) while the clock runs. One generator, in this process, on the CPU.

    .venv/bin/python bench/bench_rollout.py [--demo-dir runs/demo] [--users 2000]

Appends to bench/RESULTS.md; prints last
``RESULT users=<n> rate_users_s=<x> rollout95_s=<x> rollout100_s=<x>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _results import append  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-dir", default="runs/demo", help="a `make demo` output directory")
    ap.add_argument("--users", type=int, default=None, help="active users (default: all)")
    ap.add_argument("--dry-run", action="store_true", help="do not append to RESULTS.md")
    a = ap.parse_args()
    import torch

    from leadre.index.context import user_contexts
    from leadre.serve.config import GeneratorConfig, ServePaths
    from leadre.serve.generator import MODEL_META_KEY, GeneratorCore, model_version
    from leadre.serve.store import open_store

    demo = Path(a.demo_dir).resolve()
    for stage in ("ingest", "sids", "sft", "dpo"):
        if not (demo / stage / "manifest.json").exists():
            sys.exit(f"bench_rollout: {demo / stage} is missing: run `make demo` first")
    torch.set_num_threads(1)  # one generator replica's share of a 2-core machine
    contexts = user_contexts(str(demo / "ingest"))
    users = sorted(contexts)[:a.users] if a.users else sorted(contexts)
    cfg = GeneratorConfig()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/store.db"
        store = open_store(url)
        store.put_users({u: contexts[u] for u in users})
        core = GeneratorCore(cfg, ServePaths(str(demo / "sids"), url,
                                             model_dir=str(demo / "sft")))
        batch = cfg.generation.batch_size
        t0 = time.perf_counter()
        for i in range(0, len(users), batch):
            core.generate_and_store(users[i:i + batch])
        rate = len(users) / (time.perf_counter() - t0)
        print(f"SFT candidates for {len(users)} users at {rate:.1f} users/s", flush=True)

        # The rollout, as the admin call and a Generator replica run it.
        new_dir = str(demo / "dpo")
        t0 = time.perf_counter()
        store.set_meta(MODEL_META_KEY, json.dumps({"model_dir": new_dir,
                                                   "version": model_version(new_dir)}))
        version = core.swap_model(new_dir)
        stale = store.users_not_of_model(version)
        store.enqueue(stale, priority=True)
        swap_s = time.perf_counter() - t0
        done, t95 = 0, None
        while ids := store.claim(batch, lease_s=120):
            core.generate_and_store(ids)
            done += len(ids)
            if t95 is None and done >= 0.95 * len(stale):
                t95 = time.perf_counter() - t0
        t100 = time.perf_counter() - t0
        left = len(store.users_not_of_model(version))
        store.close()
    body = (f"| active users | generator rate (users/s) | model swap s | 95% on the new model "
            f"s | 100% s | left on the old model |\n|---|---|---|---|---|---|\n"
            f"| {len(users)} | {rate:.1f} | {swap_s:.1f} | {t95:.1f} | {t100:.1f} | {left} |\n\n"
            f"Demo artifacts ({demo.name}): SFT -> DPO rollout of the `tiny` model, one generator "
            f"in-process with 1 torch thread (a replica's share of 2 cores), beam "
            f"{cfg.generation.beam_size}, batches of {batch} users, SQLite store. The swap "
            "includes loading the new model and listing the users to regenerate; every user "
            "on the old model is queued ahead of ordinary misses. Expected 95% time = "
            f"0.95 x users / rate = {0.95 * len(users) / rate:.1f} s (derived).")
    if not a.dry_run:
        append("Serving: model rollout, time until 95% of the active users have the new "
               "model's candidates", body)
    print(f"RESULT users={len(users)} rate_users_s={rate:.1f} rollout95_s={t95:.1f} "
          f"rollout100_s={t100:.1f}")


if __name__ == "__main__":
    main()
