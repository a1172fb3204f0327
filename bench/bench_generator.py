"""Generator tier throughput: users/s of ``GeneratorCore.generate_and_store`` (stored context ->
intent-aware prompt -> trie-constrained beam search -> candidate store) at several batch sizes,
in one process, on the demo's trained model (``make demo`` first), any sft/dpo output, or,
with ``--tiny``, an untrained ``tiny`` model built here on a small synthetic world (decoding
costs the same whether or not the weights are trained).

Each batch size runs with the decoder's buckets (prompts of similar token length decoded
together, and no decode batch whose beam-expanded KV cache outgrows the CPU's caches:
``GenerationConfig.bucket_slack`` / ``max_batch_tokens``) and without them (one padded batch).

    python bench/bench_generator.py --demo-dir runs/demo --users 256 --batch-sizes 1 16 64
    python bench/bench_generator.py --tiny

CPU by default (torch on this process's cores); on a GPU machine the generator picks CUDA.
Appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: what Ray gives a 1-CPU Generator replica)")
    p.add_argument("--dry-run", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--tiny", action="store_true",
                   help="no demo at hand: build an untrained tiny model on a synthetic world")
    a = p.parse_args()

    import numpy as np
    import torch

    from _results import append
    from leadre.model.config import GenerationConfig
    from leadre.serve import GeneratorConfig, ServePaths
    from leadre.index.context import build_prompt, user_contexts
    from leadre.serve.generator import GeneratorCore
    from leadre.serve.store import open_store

    demo = Path(a.demo_dir)
    if a.tiny:
        demo = tiny_world(Path("runs/bench_generator"))
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
    lengths = []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        open_store(url).put_users({u: contexts[u] for u in users})
        for bs in a.batch_sizes:
            for slack in ([None] if bs == 1 else [0.25, None]):
                core = GeneratorCore(GeneratorConfig(ttl_s=3600, generation=GenerationConfig(
                    top_k=a.top_k, beam_size=a.beam_size, batch_size=bs)),
                                     ServePaths(str(demo / "sids"), url, model_dir=model_dir))
                if slack is None:  # one padded batch of `bs`, as before bucketing
                    core.llm.cfg.bucket_slack, core.llm.cfg.max_batch_tokens = None, 0
                if not lengths:
                    enc = core.llm.tokenizer([build_prompt(contexts[u], core.table,
                                                           cfg=core.prompt_cfg) for u in users])
                    lengths = [len(x) for x in enc["input_ids"]]
                core.generate_and_store(users[:bs])  # warm-up
                t0 = time.perf_counter()
                written = sum(core.generate_and_store(users[i:i + bs]).written
                              for i in range(0, len(users), bs))
                secs = time.perf_counter() - t0
                rows.append((bs, slack, len(users), written, secs, core.device()))
                print(f"batch {bs} bucket_slack {slack}: {len(users) / secs:.1f} users/s",
                      flush=True)
    base = rows[0][2] / rows[0][4]
    lines = ["| batch | length buckets | users | written | seconds | users/s | vs batch "
             f"{rows[0][0]} | device |", "|---|---|---|---|---|---|---|---|"]
    for bs, slack, n, w, s, dev in rows:
        buckets = "-" if bs == 1 else ("yes" if slack is not None else "no (one padded batch)")
        lines.append(f"| {bs} | {buckets} | {n} | {w} | {s:.2f} | {n / s:.1f} | "
                     f"{n / s / base:.2f}x | {dev} |")
    ab = decoder_before_after(core.llm, [build_prompt(contexts[u], core.table, cfg=core.prompt_cfg)
                                         for u in users], a.batch_sizes)
    lines += ["", "The decoder alone (`SidGenerator.generate_rows`, same prompts, best of 2 "
              "passes): *before* = HF's DynamicCache as is (every step copies the whole "
              "beam-expanded cache twice: gather + concatenate) and one padded batch; *after* = "
              "room reserved for the S-ID tokens, only generated positions gathered, length / "
              "cache buckets.", "", "| batch | before prompts/s | after prompts/s |",
              "|---|---|---|"]
    lines += [f"| {bs} | {ab[('before', bs)]:.1f} | {ab[('after', bs)]:.1f} |"
              for bs in a.batch_sizes]
    q = np.percentile(lengths, [0, 50, 90, 100]).astype(int).tolist()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    if not a.dry_run:
        append("Generator tier: users/s of GeneratorCore.generate_and_store",
               f"Model: `{model_dir}`; beam {a.beam_size}, top-{a.top_k}; torch threads "
               f"{torch.get_num_threads()}; prompt tokens min / median / p90 / max = "
               f"{' / '.join(map(str, q))}. Each user: stored context -> prompt -> constrained "
               "beam search -> candidate store (SQLite) write. Load average at the end: "
               f"{load}.\n\n" + "\n".join(lines))
    return 0


def decoder_before_after(llm, prompts: list[str], batch_sizes: list[int]) -> dict:
    """prompts/s of ``llm.generate_rows`` with the decoder's cache handling and buckets
    switched off (before) and on (after)."""
    import leadre.model.decode as G

    reserve, reorder = G.reserve, G.reorder_generated
    slack, cap = G.GenerationConfig.bucket_slack, G.GenerationConfig.max_batch_tokens  # defaults
    out: dict = {}
    try:
        for _ in range(2):
            for mode in ("before", "after"):
                if mode == "before":
                    G.reserve = lambda cache, extra: cache
                    G.reorder_generated = lambda cache, parent, n: cache.reorder_cache(parent)
                    llm.cfg.bucket_slack, llm.cfg.max_batch_tokens = None, 0
                else:
                    G.reserve, G.reorder_generated = reserve, reorder
                    llm.cfg.bucket_slack, llm.cfg.max_batch_tokens = slack, cap
                for bs in batch_sizes:
                    llm.cfg.batch_size = bs
                    t0 = time.perf_counter()
                    llm.generate_rows(prompts)
                    rate = len(prompts) / (time.perf_counter() - t0)
                    out[(mode, bs)] = max(out.get((mode, bs), 0.0), rate)
    finally:
        G.reserve, G.reorder_generated = reserve, reorder
        llm.cfg.bucket_slack, llm.cfg.max_batch_tokens = slack, cap
    return out


def tiny_world(root: Path) -> Path:
    """An untrained ``tiny`` model over a small synthetic world, laid out like a demo
    directory (``ingest/``, ``sids/``, ``dpo/``); built once and kept."""
    if (root / "dpo" / "manifest.json").exists():
        return root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serving_world import make_world

    from leadre.artifacts import write_manifest
    from leadre.index.context import build_prompt, user_contexts
    from leadre.sids import load_table
    from leadre.model.factory import prepare_base_model

    w = make_world(root, ads=1000, users=600, index=False)
    table = load_table(w["sids"])
    prompts = [build_prompt(c, table) for c in user_contexts(w["ingest"]).values()]
    prepare_base_model(root / "dpo" / "merged", sid_tokens=table.tokens(), base_model=None,
                       preset="tiny", corpus=prompts)
    write_manifest(str(root / "dpo"), "dpo", inputs={}, config={}, counts={}, timings={})
    return root


if __name__ == "__main__":
    sys.exit(main())
