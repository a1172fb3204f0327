"""GPU run of the training and generation path on the real datasets: SFT on one GPU with the
TRL trainer each Ray Train worker builds, a learning curve, then ``leadre eval`` on CUDA.

Why not ``leadre sft``: the lent GPU machine has no Ray (its wheel is larger than what can be
carried there), so this script drives the same pieces Ray Train's worker runs
(:func:`leadre.train.sft.build_trainer`, :func:`leadre.train.common.hf_args`) in one process. Under
Ray Train the only difference is the worker group around it.

The time budget is fixed in wall-clock seconds, not steps: a short calibration run measures
steps/s, then the cosine schedule is laid out over the steps that fit the budget. Every
``--curve-points`` of the way the model is scored (HR@10 / NDCG@10, constrained beam search) on
a fixed sample of validation rows: the learning curve. The final model is then scored on every
test row by ``leadre eval`` (generation on CUDA in this process), which also gives the
generator's users/s.

    python bench/bench_gpu.py --dataset scientific=.gpu/sci --dataset beauty=.gpu/beauty \
        --train-seconds 150 --out runs/gpu

Each ``--dataset NAME=DIR`` names a directory holding ``prompts/``, ``sids/`` and ``ingest/``
(outputs of those stages). Writes ``<out>/<name>/{model,merged,eval,curve.json}``,
``<out>/results.json`` and appends a section to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers import TrainerCallback  # noqa: E402

from leadre.train.common import OFFLINE_ENV  # noqa: E402

log = logging.getLogger("bench_gpu")


class Clock(TrainerCallback):
    """When each optimiser step ended (the step rate, without the start-up steps)."""

    def __init__(self):
        self.ends: list[float] = []
        self.deadline: float | None = None  # the budget holds even if calibration was off

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        if self.deadline is not None and self.ends[-1] > self.deadline:
            control.should_training_stop = True

    def steps_per_s(self, skip: int) -> float:
        ends = self.ends[min(skip, len(self.ends) - 2):]
        return (len(ends) - 1) / (ends[-1] - ends[0])


def valid_scorer(table, tokenizer, gen_cfg, valid):
    """model -> validation HR@10 / NDCG@10 under constrained decoding, on copies (the model
    keeps training)."""
    from leadre.model.decode import SidGenerator
    from leadre.eval.metrics import ranking_metrics

    def score(model) -> dict[str, float]:
        gen = SidGenerator(copy.deepcopy(model), copy.deepcopy(tokenizer), table, gen_cfg)
        recs = [[c.ad_id for c in cands] for cands in gen.generate(valid["prompt"].tolist())]
        m = ranking_metrics(recs, valid["target_ad_id"].astype(str).tolist(), [10])
        return {"valid_hr@10": round(m["hr@10"], 4), "valid_ndcg@10": round(m["ndcg@10"], 4)}

    return score


class Curve(TrainerCallback):
    """Scores the model being trained on fixed validation rows at given steps."""

    def __init__(self, steps: set[int], score_fn, timer: dict[str, float]):
        self.steps, self.score_fn, self.timer = steps, score_fn, timer
        self.points: list[dict[str, Any]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self.steps:
            return
        t0 = time.perf_counter()
        point = {"step": state.global_step,
                 "train_seconds": round(t0 - self.timer["start"] - self.timer["scoring"], 1),
                 "loss": next((e["loss"] for e in reversed(state.log_history) if "loss" in e),
                              None),
                 **self.score_fn(model)}
        self.timer["scoring"] += time.perf_counter() - t0
        self.points.append(point)
        print("curve:", point, flush=True)


def budgeted_train(trainer, curve: Curve, clock: Clock, timer: dict[str, float], score_fn,
                   a: argparse.Namespace, sync) -> tuple[float, int, float]:
    """Calibrate, then train for ``a.train_seconds``: (calibration s, timed steps, timed
    training s without curve scoring). The first ``a.calibration_steps`` (which train too)
    measure the step rate; the timed run then gets a fresh optimiser and schedule over as many
    steps as the budget holds, from the warm weights, with ``a.curve_points`` curve points."""
    t0 = time.perf_counter()
    trainer.train()
    sync()
    calib_s = time.perf_counter() - t0
    steps_per_s = clock.steps_per_s(skip=a.calibration_steps // 3)  # CUDA warm-up excluded
    total = max(a.calibration_steps, int(steps_per_s * a.train_seconds))
    every = max(1, total // a.curve_points)
    curve.steps = {every * i for i in range(1, a.curve_points + 1)}
    trainer.args.max_steps = total
    timer["start"], timer["scoring"] = time.perf_counter(), 0.0
    clock.deadline = timer["start"] + 1.2 * a.train_seconds + 5 * a.curve_points
    # Step 0 of the timed run: the model has had the calibration steps already.
    curve.points.append({"step": 0, "train_seconds": 0.0,
                         "after_calibration_steps": a.calibration_steps, **score_fn(trainer.model)})
    timer["scoring"] = time.perf_counter() - timer["start"]
    trainer.train()
    sync()
    return calib_s, total, time.perf_counter() - timer["start"] - timer["scoring"]


def run_dataset(name: str, root: Path, out: Path, a: argparse.Namespace) -> dict[str, Any]:
    import torch

    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    from leadre.eval.config import EvalConfig
    from leadre.eval.evaluate import load_eval_rows
    from leadre.eval.evaluate import run as run_eval
    from leadre.model.config import GenerationConfig
    from leadre.model.factory import load_tokenizer, prepare_base_model
    from leadre.train.config import SftConfig
    from leadre.train.sft import COLUMNS, build_trainer
    from leadre.sids.build import load_table
    from leadre.train.common import hf_args, load_split

    prompts, sids, ingest = (str(root / d) for d in ("prompts", "sids", "ingest"))
    run_dir = out / name
    tasks = ["main"] if name in a.main_only else None
    cfg = SftConfig(prompts_dir=prompts, sids_dir=sids, out=str(run_dir), preset=a.preset, tasks=tasks,
                    finetune="full", batch_size=a.batch_size, learning_rate=a.lr,
                    max_steps=a.calibration_steps, logging_steps=50, save_steps=10**9,
                    max_length=a.max_length, bf16=a.device == "cuda",
                    device="gpu" if a.device == "cuda" else "cpu", seed=0, warmup_ratio=0.03,
                    num_workers=1)
    table = load_table(sids)
    t0 = time.perf_counter()
    train = load_split(prompts, "sft", "train", COLUMNS, tasks=tasks)
    corpus = train.slice(0, cfg.tokenizer_corpus_rows)
    model_dir = run_dir / "model"
    info = prepare_base_model(model_dir, sid_tokens=table.tokens(), base_model=None,
                              preset=a.preset, corpus=corpus.column("prompt").to_pylist()
                              + corpus.column("completion").to_pylist(), seed=0)
    prep_s = time.perf_counter() - t0

    valid = load_eval_rows(prompts, "valid").sample(frac=1.0, random_state=0).head(a.curve_rows)
    gen_cfg = GenerationConfig(beam_size=20, top_k=10, batch_size=a.gen_batch, device=a.device,
                             dtype="bfloat16" if a.device == "cuda" else "float32")
    tokenizer = load_tokenizer(model_dir)

    score = valid_scorer(table, tokenizer, gen_cfg, valid)

    timer = {"start": 0.0, "scoring": 0.0}
    curve = Curve(set(), score, timer)
    args = hf_args(cfg, str(run_dir / "hf"), has_eval=False, use_gpu=a.device == "cuda")
    args["dataset_num_proc"] = a.tokenize_procs
    t0 = time.perf_counter()
    clock = Clock()
    trainer = build_trainer(cfg, {"model_dir": str(model_dir), "has_eval": False}, args,
                            [curve, clock])
    tokenize_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in trainer.model.parameters())

    calib_s, total, train_s = budgeted_train(trainer, curve, clock, timer, score, a, sync)
    train_hist = [e for e in trainer.state.log_history if "loss" in e]
    trainer.save_model(str(run_dir / "merged"))
    tokenizer.save_pretrained(str(run_dir / "merged"))

    ev = run_eval(EvalConfig(prompts_dir=prompts, model_dir=str(run_dir / "merged"),
                             sids_dir=sids, ingest_dir=ingest, out=str(run_dir / "eval"),
                             split="test", generate_on="local", device=a.device,
                             max_rows=a.test_rows,
                             batch_size=a.gen_batch, baselines=["most_popular"]))
    report = json.loads((run_dir / "eval" / "metrics.json").read_text())
    result = {
        "dataset": name, "preset": a.preset, "tasks": tasks or "all", "parameters": n_params,
        "model": info.get("preset"),
        "train_examples": train.num_rows, "batch_size": a.batch_size, "lr": a.lr,
        "steps": a.calibration_steps + total, "epochs": round(
            (a.calibration_steps + total) * a.batch_size / train.num_rows, 2),
        "train_seconds": round(train_s + calib_s, 1),
        "samples_per_s": round(total * a.batch_size / train_s, 1),
        "seconds": {"model_prep": round(prep_s, 1), "tokenize": round(tokenize_s, 1),
                    "curve_scoring": round(timer["scoring"], 1)},
        "loss_first_last": [train_hist[0]["loss"], train_hist[-1]["loss"]] if train_hist else None,
        "curve": curve.points,
        "test": report["methods"], "generation": report["generation"],
        "eval_summary": ev.get("summary"),
    }
    (run_dir / "curve.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| dataset | params | steps (epochs) | train s | samples/s | test rows | R@5 | N@5 "
             "| R@10 | N@10 | most-popular R@10 | generation users/s | invalid |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['dataset']} | failed: {r['error']} |")
            continue
        llm = next(k for k in r["test"] if k != "most_popular")
        m, g = r["test"][llm], r["generation"][llm]
        lines.append(
            f"| {r['dataset']} | {r['parameters'] / 1e6:.1f} M | {r['steps']} ({r['epochs']}) "
            f"| {r['train_seconds']} | {r['samples_per_s']} | {g['rows']} "
            f"| {m['recall@5']:.4f} | {m['ndcg@5']:.4f} | {m['recall@10']:.4f} "
            f"| {m['ndcg@10']:.4f} | {r['test']['most_popular']['recall@10']:.4f} "
            f"| {g['rows_per_s']} | {g['invalid_rate']} |")
    lines.append("\nLearning curves (validation sample, HR@10 / NDCG@10 by training step):\n")
    for r in results:
        if "curve" in r:
            pts = ", ".join(f"{p['step']}: {p['valid_hr@10']:.4f}/{p['valid_ndcg@10']:.4f}"
                            for p in r["curve"])
            lines.append(f"- {r['dataset']}: {pts}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", action="append", required=True, metavar="NAME=DIR",
                   help="dataset name and the directory with its prompts/, sids/, ingest/")
    p.add_argument("--out", default="runs/gpu", help="output directory")
    p.add_argument("--preset", default="small", help="model size built from scratch")
    p.add_argument("--train-seconds", type=float, default=150, help="training budget per dataset")
    p.add_argument("--calibration-steps", type=int, default=30, help="steps that time the rate")
    p.add_argument("--batch-size", type=int, default=256, help="examples per optimiser step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example")
    p.add_argument("--curve-points", type=int, default=4, help="learning-curve points")
    p.add_argument("--curve-rows", type=int, default=1000, help="validation rows per point")
    p.add_argument("--gen-batch", type=int, default=256, help="prompts per beam-search batch")
    p.add_argument("--tokenize-procs", type=int, default=8, help="processes tokenising data")
    p.add_argument("--main-only", action="append", default=[], metavar="NAME",
                   help="train this dataset on the main task only (e.g. no item text)")
    p.add_argument("--test-rows", type=int, default=None, help="score a sample of test rows")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check this script on a CPU (tiny steps; nothing is appended)")
    p.add_argument("--no-append", action="store_true", help="don't append to bench/RESULTS.md")
    a = p.parse_args()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # one line per stage
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    a.device = "cpu" if a.cpu_smoke else "cuda"
    a.no_append = a.no_append or a.cpu_smoke
    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; this benchmark needs a GPU (or --cpu-smoke)",
              file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for spec in a.dataset:
        name, _, root = spec.partition("=")
        t0 = time.perf_counter()
        try:
            results.append(run_dataset(name, Path(root).resolve(), out, a))
        except Exception as e:  # one dataset failing must not lose the others' results
            log.exception("%s failed", name)
            results.append({"dataset": name, "error": f"{type(e).__name__}: {e}"})
        results[-1]["wall_seconds"] = round(time.perf_counter() - t0, 1)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    body = markdown(results)
    print(body)
    if not a.no_append:
        from _results import append

        append(f"GPU: SFT ({a.preset}, full fine-tune, bf16) + constrained generation on real "
               f"datasets, {a.train_seconds:g} s training budget each", body)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
