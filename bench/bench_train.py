"""Training throughput of ``leadre sft`` with 1 and with 2 Ray Train workers, in one run, on the
same data, model and per-worker batch (data parallel: 2 workers see 2x the examples per step).

samples/s = examples per optimiser step / time inside optimiser steps (median over logging
windows; evaluation, checkpointing and the ~26 s Ray Train start are excluded; they are in
the wall-clock column). On a CPU each worker runs torch with one thread per reserved core
(``cpus_per_worker``); on a GPU machine ``--device gpu`` trains with bf16 where supported.

    python bench/bench_train.py                       # small preset, CPU, appends RESULTS.md
    python bench/bench_train.py --preset tiny --steps 20 --no-append
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    from leadre.model.factory import PRESETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=list(PRESETS))
    p.add_argument("--steps", type=int, default=24, help="optimiser steps per run")
    p.add_argument("--batch-size", type=int, default=8, help="examples per worker per step")
    p.add_argument("--workers", default="1,2", help="worker counts to compare")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"])
    p.add_argument("--users", type=int, default=1500, help="users of the fixture world")
    p.add_argument("--no-append", action="store_true", help="print only, no RESULTS.md entry")
    a = p.parse_args()

    from train_data import write_prompts

    from leadre.runtime import RayConfig, init_ray
    from leadre.train.config import SftConfig
    from leadre.train.sft import run

    init_ray(RayConfig())
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="leadre-bench-train-") as tmp:
        world = write_prompts(Path(tmp) / "w", n_users=a.users, seed=0)
        for n in [int(x) for x in a.workers.split(",")]:
            t0 = time.perf_counter()
            m = run(SftConfig(prompts_dir=str(world["prompts"]), out=f"{tmp}/sft{n}", finetune="lora",
                              preset=a.preset, max_steps=a.steps, batch_size=a.batch_size,
                              logging_steps=max(1, a.steps // 6), save_steps=a.steps,
                              num_workers=n, cpus_per_worker=a.cpus_per_worker,
                              device=a.device, max_eval_samples=64))
            t = m["training"]
            rows.append({"workers": n, "device": t["device"], "sps": t["samples_per_second"],
                         "params": m["model"]["parameters"], "wall": time.perf_counter() - t0,
                         "fit": m["timings_s"]["fit"],
                         "loss": f"{t['loss_start']:.3f} -> {t['loss_end']:.3f}"})
            print(rows[-1], flush=True)
    base = rows[0]["sps"]
    lines = [f"`leadre sft`, preset `{a.preset}` ({rows[0]['params']:,} parameters), LoRA, "
             f"{a.steps} steps, {a.batch_size} examples per worker per step, fixture prompts "
             f"(~80 tokens), cpus_per_worker={a.cpus_per_worker}.", "",
             "| workers | device | samples/s | vs 1 worker | fit s (incl. Ray Train start) "
             "| loss |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['device']} | {r['sps']:.1f} | "
                     f"{r['sps'] / base:.2f}x | {r['fit']:.1f} | {r['loss']} |")
    lines += ["", "samples/s: time inside optimiser steps only (median logging window). The "
              "machine's cores are shared with other jobs: 1-minute load average "
              f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (on {os.cpu_count()} "
              "cores); a load above the core count makes the ratio meaningless."]
    body = "\n".join(lines)
    if a.no_append:
        print(body)
    else:
        from _results import append

        append(f"Training throughput, 1 vs 2 Ray Train workers ({rows[0]['device']})", body)


if __name__ == "__main__":
    main()
