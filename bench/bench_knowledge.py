"""What each knowledge ingredient buys: one recipe, then one ingredient changed at a time.

    python bench/bench_knowledge.py --data demo                  # the synthetic world
    python bench/bench_knowledge.py --data scientific --variants chosen --preset base \
        --steps 3600 --lr 2e-3 --weight-decay 0.1 --selection-rows 512 --beam-size 20 --test

Every variant trains the same number of optimizer steps and is scored on the *valid* users
(tuning rows; the test split is never read here). The recipe is the one the pipeline
defaults to: MiniLM vectors, RQ-KMeans S-IDs, content events as knowledge tokens, S-ID rows
started from their codebook vectors, auxiliary tasks, cross-domain facets. The other rows
each change one ingredient back:

=============  ===========================================================================
encoder=lsa    S-IDs from TF-IDF+SVD vectors instead of the pretrained sentence encoder
quantizer=rqvae RQ-VAE instead of residual k-means
content=title  content events show their titles (words) instead of their knowledge tokens
init=mean      S-ID token rows start as an average token instead of their codebook vector
no_aux         main task only (no ad text <-> S-ID, no titles-for-S-IDs examples)
no_xd          no content-domain events in the history (cross-domain facets off)
chosen         what the rows chose: RQ-VAE codes and no auxiliary tasks (the main task gets
               every step)
=============  ===========================================================================

Each row also gives its S-IDs' quality (collision rate before the disambiguation level,
per-level utilisation, first-level same-category share). Stage outputs are reused when their
manifest exists (an interrupted run resumes). ``--test`` then scores the first variant (the
chosen recipe) once on the test split beside most-popular, SASRec and the text-aware SASRec,
on the same users. Appends a table to bench/RESULTS.md and prints ``RESULT ...`` (with
``--test``: ``RESULT data=<d> leadre_r10=.. sasrec_r10=.. text_sasrec_r10=.. ratio=..``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import append  # noqa: E402
from _stages import done as _done, run as _run  # noqa: E402

RECIPE = {"encoder": "hf", "quantizer": "rqkmeans", "content": "code", "init": "codebook",
          "aux": True, "xd": True}
VARIANTS = {
    "recipe": {},
    "encoder=lsa": {"encoder": "lsa"},
    "quantizer=rqvae": {"quantizer": "rqvae"},
    "content=title": {"content": "title"},
    "init=mean": {"init": "mean"},
    "no_aux": {"aux": False},
    "no_xd": {"xd": False},
    # what the rows above chose on the demo's valid split: RQ-VAE codes, no auxiliary tasks
    "chosen": {"quantizer": "rqvae", "aux": False},
}
SCIENTIFIC = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "scientific"


def sid_builds(out: Path) -> str:
    """Every S-ID build under ``out`` (encoder x quantiser) on the quality numbers."""
    lines = ["| S-IDs (encoder_quantiser) | codes per level | collision rate | utilisation | "
             "entropy (normalised) | 1st-level same category (random pairs) |",
             "|---|---|---|---|---|---|"]
    for d in sorted(out.glob("sids_*")):
        if not _done(d):
            continue
        q = json.loads((d / "manifest.json").read_text())["summary"]
        cat = q.get("first_level_same_category") or {}
        lines.append(f"| {d.name[5:]} | {q['codebook_sizes'][:-1]} | {q['collision_rate']:.3f} | "
                     + " / ".join(f"{u:.2f}" for u in q["utilisation"]) + " | "
                     + " / ".join(f"{e:.2f}" for e in q["entropy_norm"]) + " | "
                     + f"{cat.get('same_code_pairs', float('nan')):.3f} "
                       f"({cat.get('random_pairs', float('nan')):.3f}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["demo", "scientific"], default="demo")
    ap.add_argument("--out", default=None, help="work directory (default runs/knowledge_<data>)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=1200, help="SFT optimizer steps, every variant")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--test", action="store_true",
                    help="score the first variant on the test split with the baselines")
    ap.add_argument("--beam-size", type=int, default=10)
    ap.add_argument("--selection-rows", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-rows", type=int, default=None, help="valid users scored (all)")
    args = ap.parse_args()

    from leadre.config import from_dict
    from leadre.data.config import IngestConfig, SynthConfig
    from leadre.eval.config import EvalConfig
    from leadre.prompts import PromptConfig
    from leadre.runtime import RayConfig
    from leadre.sids.config import SidConfig
    from leadre.train.config import SftConfig

    out = Path(args.out or f"runs/knowledge_{args.data}").resolve()
    ray = RayConfig(num_cpus=2, quiet=True)
    ingest = out / "ingest"
    if not _done(ingest):
        if args.data == "demo":
            world = out / "world"
            _run("generate", SynthConfig(out=str(world), users=2000, ads=500, seed=0))
            _run("ingest", IngestConfig(input_dir=str(world), out=str(ingest), ray=ray))
        else:
            _run("ingest", IngestConfig(source="lcrec", input_dir=str(SCIENTIFIC),
                                        out=str(ingest), ray=ray))
    loo = args.data == "scientific"
    results: dict[str, dict] = {}
    baselines: dict[str, dict] = {}
    quality: dict[str, dict] = {}
    models: dict[str, tuple[Path, Path]] = {}
    for name in args.variants:
        v = {**RECIPE, **VARIANTS[name]}
        sids = out / f"sids_{v['encoder']}_{v['quantizer']}"
        if not _done(sids):
            _run("sids", SidConfig(ingest_dir=str(ingest), out=str(sids), encoder=v["encoder"],
                                   quantizer=v["quantizer"], seed=0, ray=ray))
        pkey = f"{sids.name}_{v['content']}_{'aux' if v['aux'] else 'noaux'}_" \
               f"{'xd' if v['xd'] else 'ad'}"
        prompts = out / f"prompts_{pkey}"
        if not _done(prompts):
            p = {"ingest_dir": str(ingest), "sids_dir": str(sids), "out": str(prompts),
                 "content_object": v["content"], "seed": 0, "ray": ray}
            if not loo:
                p.update(max_events=12, instruction=False, question=False)
            else:
                p.update(instruction=False, question=False, aux_titles=0.0)
            if not v["xd"]:
                p["history_actions"] = ["click", "conversion"]
            _run("prompts", from_dict(PromptConfig, p))
        sft = out / f"sft_{pkey}_{v['init']}_s{args.seed}"
        if not _done(sft):
            _run("sft", from_dict(SftConfig, {
                "prompts_dir": str(prompts), "out": str(sft), "preset": args.preset,
                "num_workers": 2, "max_steps": args.steps, "batch_size": args.batch_size,
                "learning_rate": args.lr, "weight_decay": args.weight_decay,
                "save_steps": max(args.steps // 3, 1),
                "logging_steps": 50, "sid_init": v["init"], "seed": args.seed,
                "tasks": None if v["aux"] else ["main"],
                "selection_rows": args.selection_rows, "ray": ray}))
        quality[name] = json.loads((sids / "manifest.json").read_text())["summary"]
        models[name] = (prompts, sft)
        ev = out / f"eval_{name}_s{args.seed}"
        if not _done(ev):
            _run("eval", from_dict(EvalConfig, {
                "prompts_dir": str(prompts), "model_dir": str(sft), "out": str(ev),
                "split": "valid", "max_rows": args.max_rows,
                "generation": {"beam_size": args.beam_size},
                "baselines": ["sasrec", "text_sasrec"] if name == args.variants[0] else [],
                "seed": 0, "ray": ray}))
        report = json.loads((ev / "metrics.json").read_text())
        for m, met in report["methods"].items():
            if m.startswith("leadre"):
                results[name] = met
            else:
                baselines[m] = met

    lines = ["| variant | valid HR@10 | NDCG@10 | HR@10 95% CI | S-ID collisions | "
             "utilisation per level | 1st-level same category |", "|---|---|---|---|---|---|---|"]
    for name, m in [*results.items(), *baselines.items()]:
        ci = m.get("hr@10_ci") or [float("nan")] * 2
        q = quality.get(name)
        sid_cells = ([f"{q['collision_rate']:.3f}", " / ".join(f"{u:.2f}" for u in q["utilisation"]),
                      f"{(q.get('first_level_same_category') or {}).get('same_code_pairs', float('nan')):.3f}"]
                     if q else ["", "", ""])
        lines.append(f"| {name} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | "
                     f"[{ci[0]:.3f}, {ci[1]:.3f}] | " + " | ".join(sid_cells) + " |")
    first = json.loads((out / f"eval_{args.variants[0]}_s{args.seed}" / "metrics.json"
                        ).read_text())
    body = sid_builds(out) + "\n\n" + (f"Data: {args.data}; preset {args.preset}, {args.steps} SFT steps of 2 x "
            f"{args.batch_size} for every variant, seed {args.seed}; valid split, "
            f"{first.get('rows')} users (hash {first.get('users_hash')}), beam "
            f"{args.beam_size}.\n\n" + "\n".join(lines))
    result = "RESULT data=" + args.data + " " + " ".join(
        f"{k.replace('=', '_')}_hr10={m['hr@10']:.4f}" for k, m in
        [*results.items(), *baselines.items()])
    if args.test:
        prompts, sft = models[args.variants[0]]
        ev = out / f"test_{args.variants[0]}_s{args.seed}"
        if not _done(ev):
            _run("eval", from_dict(EvalConfig, {
                "prompts_dir": str(prompts), "model_dir": str(sft), "out": str(ev),
                "split": "test", "generation": {"beam_size": args.beam_size},
                "baselines": ["most_popular", "sasrec", "text_sasrec"], "seed": 0,
                "ray": ray}))
        t = json.loads((ev / "metrics.json").read_text())
        ours = next(m for n, m in t["methods"].items() if n.startswith("leadre"))
        sas, txt = t["methods"]["sasrec"], t["methods"]["text_sasrec"]
        rows = ["| method | test R@10 [95% CI] | NDCG@10 |", "|---|---|---|"]
        for n, m in t["methods"].items():
            ci = m.get("hr@10_ci") or [float("nan")] * 2
            rows.append(f"| {n} | {m['hr@10']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | "
                        f"{m['ndcg@10']:.4f} |")
        for n, d in (t.get("differences") or {}).items():
            rows.append(f"| {n} (paired) | {d['hr@10'][0]:+.4f} [{d['hr@10'][1]:+.4f}, "
                        f"{d['hr@10'][2]:+.4f}] | {d['ndcg@10'][0]:+.4f} |")
        body += (f"\n\nThe recipe ({args.variants[0]}) on the test split, {t.get('rows')} "
                 f"users (hash {t.get('users_hash')}):\n\n" + "\n".join(rows))
        result = (f"RESULT data={args.data} leadre_r10={ours['hr@10']:.4f} "
                  f"sasrec_r10={sas['hr@10']:.4f} text_sasrec_r10={txt['hr@10']:.4f} "
                  f"ratio={ours['hr@10'] / sas['hr@10']:.3f}")
    append(f"Knowledge ingredients ({args.data})", body)
    print(result)


if __name__ == "__main__":
    main()
