"""One model, two ways to retrieve: the dense head's fused ranking against the beam alone,
the sequential baselines and content ANN, on warm and cold targets, plus the channel view.

    python bench/bench_dense.py --data demo
    python bench/bench_dense.py --data scientific --preset base --steps 5400 --lr 2e-3 \
        --weight-decay 0.1

Pipeline (stage outputs are reused when their manifest exists, so an interrupted run
resumes): ingest with the cold-start split (``--cold-fraction`` of the ads withheld from every
training interaction and from quantiser training; they are test targets only) -> S-IDs
(MiniLM + RQ-VAE) -> prompts (knowledge tokens, main task) -> SFT with the dense head (the
fusion weight tuned on validation users at the end of training) -> eval on the *test* split
with most-popular, SASRec, text-aware SASRec and content ANN on the same users, and the
channel view (SASRec top K + LEADRE top K against SASRec top 2K).

Appends the tables to bench/RESULTS.md (the fusion tuning on valid too) and prints
``RESULT data=<d> fused_r10=.. beam_r10=.. sasrec_r10=.. text_sasrec_r10=.. cold_r10=..
cold_ann_r10=..``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import append  # noqa: E402
from _stages import done as _done, run as _run  # noqa: E402

SCIENTIFIC = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "scientific"


def _cell(m: dict, key: str) -> str:
    ci = m.get(f"{key}_ci")
    return f"{m[key]:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["demo", "scientific"], default="demo")
    ap.add_argument("--out", default=None, help="work directory (default runs/dense_<data>)")
    ap.add_argument("--cold-fraction", type=float, default=0.1,
                    help="share of ads withheld from training (test targets only)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=1200, help="SFT optimizer steps")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--dense-weight", type=float, default=0.5)
    ap.add_argument("--beam-size", type=int, default=20)
    ap.add_argument("--channel-k", type=int, default=50)
    ap.add_argument("--selection-rows", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from leadre.config import from_dict
    from leadre.data.config import IngestConfig, SynthConfig
    from leadre.eval.config import EvalConfig
    from leadre.prompts import PromptConfig
    from leadre.runtime import RayConfig
    from leadre.sids.config import SidConfig
    from leadre.train.config import SftConfig

    out = Path(args.out or f"runs/dense_{args.data}").resolve()
    ray = RayConfig(num_cpus=2, quiet=True)
    ingest, sids, prompts = out / "ingest", out / "sids", out / "prompts"
    sft, ev = out / f"sft_s{args.seed}", out / f"test_s{args.seed}"
    t_start = time.time()
    if not _done(ingest):
        if args.data == "demo":
            world = out / "world"
            _run("generate", SynthConfig(out=str(world), users=2000, ads=500, seed=0))
            _run("ingest", IngestConfig(input_dir=str(world), out=str(ingest),
                                        cold_fraction=args.cold_fraction, ray=ray))
        else:
            _run("ingest", IngestConfig(source="lcrec", input_dir=str(SCIENTIFIC),
                                        out=str(ingest), cold_fraction=args.cold_fraction,
                                        ray=ray))
    if not _done(sids):
        _run("sids", SidConfig(ingest_dir=str(ingest), out=str(sids), encoder="hf",
                               quantizer="rqvae", seed=0, ray=ray))
    if not _done(prompts):
        p = {"ingest_dir": str(ingest), "sids_dir": str(sids), "out": str(prompts),
             "content_object": "code", "seed": 0, "instruction": False, "question": False,
             "ray": ray}
        p.update({"max_events": 12} if args.data == "demo" else {"aux_titles": 0.0})
        _run("prompts", from_dict(PromptConfig, p))
    if not _done(sft):
        _run("sft", from_dict(SftConfig, {
            "prompts_dir": str(prompts), "out": str(sft), "preset": args.preset,
            "num_workers": 2, "max_steps": args.steps, "batch_size": args.batch_size,
            "learning_rate": args.lr, "weight_decay": args.weight_decay,
            "save_steps": max(args.steps // 3, 1), "logging_steps": 50, "seed": args.seed,
            "tasks": ["main"], "dense_weight": args.dense_weight,
            "selection_rows": args.selection_rows, "ray": ray}))
    if not _done(ev):
        _run("eval", from_dict(EvalConfig, {
            "prompts_dir": str(prompts), "model_dir": str(sft), "out": str(ev),
            "split": "test", "generation": {"beam_size": args.beam_size},
            "channel_k": args.channel_k,
            "baselines": ["most_popular", "sasrec", "text_sasrec", "embedding_ann"],
            "seed": 0, "ray": ray}))

    t = json.loads((ev / "metrics.json").read_text())
    sm = json.loads((sft / "manifest.json").read_text())
    methods = t["methods"]
    fused = next(n for n in methods if n.startswith("leadre") and not n.endswith("-beam"))
    beam = f"{fused}-beam"
    rows = ["| method | test R@10 [95% CI] | NDCG@10 [95% CI] | cold R@10 | cold NDCG@10 | "
            "warm R@10 | warm NDCG@10 |", "|---|---|---|---|---|---|---|"]
    for n, m in methods.items():
        cold, warm = m.get("cold") or {}, m.get("warm") or {}
        rows.append(f"| {n} | {_cell(m, 'hr@10')} | {_cell(m, 'ndcg@10')} | "
                    f"{cold.get('recall@10', float('nan')):.4f} | "
                    f"{cold.get('ndcg@10', float('nan')):.4f} | "
                    f"{warm.get('recall@10', float('nan')):.4f} | "
                    f"{warm.get('ndcg@10', float('nan')):.4f} |")
    for n, d in (t.get("differences") or {}).items():
        rows.append(f"| {n} (paired difference) | {d['hr@10'][0]:+.4f} [{d['hr@10'][1]:+.4f}, "
                    f"{d['hr@10'][2]:+.4f}] | {d['ndcg@10'][0]:+.4f} [{d['ndcg@10'][1]:+.4f}, "
                    f"{d['ndcg@10'][2]:+.4f}] | | | | |")
    targets = next(iter(methods.values())).get("cold", {}).get("targets")
    fusion = sm["training"].get("fusion") or {}
    tuning = ("Fusion weight tuned on " f"{fusion.get('rows')} validation users (HR@10 of the "
              "fused top 10 by weight; 0 = the beam alone; dense head alone "
              f"{fusion.get('dense_only_hr@10', float('nan')):.4f}): "
              + ", ".join(f"{w}: {h:.4f}" for w, h in (fusion.get("hr@10_by_weight") or {}
                                                         ).items())
              + f"; chosen {fusion.get('weight')}.")
    ch = t.get("channel") or {}
    channel = ""
    if ch:
        channel = "Channel view: " + json.dumps({k: v for k, v in ch.items()
                                                 if not isinstance(v, dict)})
    sft_s = sm["timings_s"].get("fit", 0.0)
    body = (f"Data: {args.data}; cold-start split {args.cold_fraction:.0%} of ads "
            f"({targets} cold test targets); preset {args.preset}, {args.steps} SFT steps of "
            f"2 x {args.batch_size} ({sft_s / 60:.1f} min of training, "
            f"{sm['training'].get('samples_per_second')} samples/s), dense weight "
            f"{args.dense_weight}; test split, {t.get('rows')} users (hash "
            f"{t.get('users_hash')}), beam {args.beam_size} + 50 dense candidates; whole "
            f"bench {(time.time() - t_start) / 60:.0f} min this call.\n\n" + "\n".join(rows)
            + "\n\n" + tuning + ("\n\n" + channel if channel else ""))
    append(f"Dense head and fused ranking ({args.data})", body)
    print(body)
    cold_of = {n: (m.get("cold") or {}).get("recall@10", float("nan")) for n, m in methods.items()}
    print(f"RESULT data={args.data} fused_r10={methods[fused]['hr@10']:.4f} "
          f"beam_r10={methods[beam]['hr@10']:.4f} sasrec_r10={methods['sasrec']['hr@10']:.4f} "
          f"text_sasrec_r10={methods['text_sasrec']['hr@10']:.4f} "
          f"cold_r10={cold_of[fused]:.4f} cold_ann_r10={cold_of['embedding_ann']:.4f}")


if __name__ == "__main__":
    main()
