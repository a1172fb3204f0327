"""Generator tier throughput: users/s of ``GeneratorCore.generate_and_store`` (stored context ->
intent-aware prompt -> trie-constrained beam search -> candidate store) at several batch sizes,
in one process, on the demo's trained model (``make demo`` first) or any sft/dpo output.

    python bench/bench_generator.py --demo-dir runs/demo --users 256 --batch-sizes 1 16 64

CPU by default (torch on this process's cores); on a GPU machine the generator picks CUDA.
Appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo-dir", default="runs/demo", help="a `leadre demo` output directory")
    p.add_argument("--model-dir", default=None, help="sft/dpo output (default: <demo>/dpo)")
    p.add_argument("--users", type=int, default=256, help="users generated per batch size")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--beam-size", type=int, default=20)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    a = p.parse_args()

    import torch

    from _results import append
    from leadre.serve import GeneratorConfig, ServePaths
    from leadre.serve.context import user_contexts
    from leadre.serve.generator import GeneratorCore
    from leadre.serve.store import open_store

    demo = Path(a.demo_dir)
    model_dir = a.model_dir or str(demo / "dpo")
    for need in (demo / "ingest", demo / "sids", Path(model_dir)):
        if not need.exists():
            print(f"bench_generator: {need} is missing; run `make demo` first", file=sys.stderr)
            return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    contexts = user_contexts(str(demo / "ingest"))
    users = list(contexts)[:a.users]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        open_store(url).put_users({u: contexts[u] for u in users})
        for bs in a.batch_sizes:
            core = GeneratorCore(GeneratorConfig(ttl_s=3600, top_k=a.top_k,
                                                 beam_size=a.beam_size, batch_size=bs),
                                 ServePaths(str(demo / "sids"), url, model_dir=model_dir))
            core.generate_and_store(users[:bs])  # warm-up
            t0 = time.perf_counter()
            written = sum(core.generate_and_store(users[i:i + bs]).written
                          for i in range(0, len(users), bs))
            secs = time.perf_counter() - t0
            rows.append((bs, len(users), written, secs, core.device()))
            print(f"batch {bs}: {len(users) / secs:.1f} users/s", flush=True)
    base = rows[0][1] / rows[0][3]
    lines = ["| batch | users | written | seconds | users/s | vs batch " f"{rows[0][0]} | device |",
             "|---|---|---|---|---|---|---|"]
    for bs, n, w, s, dev in rows:
        lines.append(f"| {bs} | {n} | {w} | {s:.2f} | {n / s:.1f} | {n / s / base:.2f}x | {dev} |")
    append("Generator tier: users/s of GeneratorCore.generate_and_store",
           f"Model: `{model_dir}`; beam {a.beam_size}, top-{a.top_k}; torch threads "
           f"{torch.get_num_threads()}. Each user: stored context -> prompt -> constrained beam "
           "search -> candidate store (SQLite) write.\n\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
