"""Generator users/s per CPU core for each model preset (``tiny``, ``base``, ...), measured the
way the serving Generator works: ``GeneratorCore.generate_and_store`` (stored context ->
prompt -> trie-constrained beam search, beam 20, top-20 -> candidate store write), one torch
thread (what Ray gives a 1-CPU replica), on untrained models of each preset built here over one
synthetic world (decoding costs the same whether or not the weights are trained). The presets
run in turns, ``--rounds`` times, in one process, so a busy shared machine slows them alike;
the median is reported. docs/capacity.md sizes the generator tier from it.

    python bench/bench_presets.py [--presets tiny base] [--users 128] [--batch-size 16]

Appends to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench._results import append  # noqa: E402


def world(root: Path, presets: list[str]) -> Path:
    """One synthetic world (ingest + S-IDs) and an untrained model per preset, laid out like
    a ``leadre dpo`` output each (``<preset>/merged``); built once and kept."""
    from serving_world import make_world

    from leadre.artifacts import write_manifest
    from leadre.index.context import build_prompt, user_contexts
    from leadre.model.factory import prepare_base_model
    from leadre.sids import load_table

    if not (root / "sids").exists():
        make_world(root, ads=1000, users=600, index=False)
    table = load_table(str(root / "sids"))
    prompts = None
    for preset in presets:
        out = root / preset
        if (out / "manifest.json").exists():
            continue
        if prompts is None:
            prompts = [build_prompt(c, table) for c in user_contexts(str(root / "ingest")).values()]
        prepare_base_model(out / "merged", sid_tokens=table.tokens(), base_model=None,
                           preset=preset, corpus=prompts)
        write_manifest(str(out), "dpo", inputs={}, config={}, counts={}, timings={})
    return root


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "base"])
    p.add_argument("--users", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--root", default="runs/bench_presets")
    a = p.parse_args()

    import numpy as np
    import torch

    from leadre.index.context import build_prompt, user_contexts
    from leadre.model.config import GenerationConfig
    from leadre.serve import GeneratorConfig, ServePaths
    from leadre.serve.generator import GeneratorCore
    from leadre.serve.store import open_store

    torch.set_num_threads(a.threads)
    root = world(Path(a.root), a.presets)
    contexts = user_contexts(str(root / "ingest"))
    users = list(contexts)[:a.users]
    rates: dict[str, list[float]] = {p: [] for p in a.presets}
    info: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        open_store(url).put_users({u: contexts[u] for u in users})
        cores = {}
        for preset in a.presets:
            core = GeneratorCore(GeneratorConfig(ttl_s=3600, generation=GenerationConfig(
                top_k=20, beam_size=20, batch_size=a.batch_size)),
                ServePaths(str(root / "sids"), url, model_dir=str(root / preset)))
            model = core.llm.model
            lengths = [len(x) for x in core.llm.tokenizer(
                [build_prompt(contexts[u], core.table, cfg=core.prompt_cfg)
                 for u in users])["input_ids"]]
            info[preset] = {"params": sum(t.numel() for t in model.parameters()),
                            "tokens": int(np.median(lengths)), "device": core.device()}
            core.generate_and_store(users[:a.batch_size])  # warm-up
            cores[preset] = core
        for _ in range(a.rounds):
            for preset, core in cores.items():
                t0 = time.perf_counter()
                for i in range(0, len(users), a.batch_size):
                    core.generate_and_store(users[i:i + a.batch_size])
                rates[preset].append(len(users) / (time.perf_counter() - t0))
                print(f"{preset}: {rates[preset][-1]:.1f} users/s", flush=True)

    first = a.presets[0]
    ref = statistics.median(rates[first])
    lines = [f"| preset | parameters | users/s per core (median of {a.rounds}) | all rounds | "
             f"vs {first} | parameters vs {first} |", "|---|---|---|---|---|---|"]
    for preset in a.presets:
        med = statistics.median(rates[preset])
        lines.append(f"| {preset} | {info[preset]['params'] / 1e6:.2f} M | **{med:.1f}** | "
                     f"{', '.join(f'{r:.1f}' for r in rates[preset])} | {med / ref:.2f}x | "
                     f"{info[preset]['params'] / info[first]['params']:.1f}x |")
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    append("Generator tier: users/s per CPU core by model preset",
           f"Untrained models built from each preset over one synthetic world (1,000 ads, "
           f"600 users); {len(users)} users per round, batch {a.batch_size}, beam 20, top-20, "
           f"torch threads {torch.get_num_threads()}, device {info[first]['device']}; prompt "
           f"tokens median {info[first]['tokens']}. Each user: stored context -> prompt -> "
           f"constrained beam search -> SQLite store write (`GeneratorCore.generate_and_store`). "
           f"Presets in turns, {a.rounds} rounds. Load average at the end: {load} (shared "
           f"2-core machine).\n\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
