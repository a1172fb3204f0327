"""After a Ray Train run: which checkpoint to export, the metrics history it carries, and
writing ``<out>/adapter`` (LoRA runs), ``<out>/merged`` (a plain transformers model) and
``<out>/dense`` (the checkpoint's dense head, when it trained one)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from leadre.model.dense import DENSE_DIR
from leadre.model.factory import ADAPTER_DIR, MERGED_DIR, MODEL_DIR, load_model, load_tokenizer


def _hf_dir(checkpoint_dir: str | Path) -> Path:
    from leadre.train.callbacks import HF_CHECKPOINT

    return Path(checkpoint_dir) / HF_CHECKPOINT


def _trainer_state(checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return json.loads((_hf_dir(d) / "trainer_state.json").read_text())


def choose_checkpoint(result, has_eval: bool, key: str = "eval_loss", higher: bool = False):
    """(checkpoint, its metrics): the best ``key`` among the kept checkpoints, or the latest
    without validation data."""
    if has_eval and result.best_checkpoints:
        scored = [(c, m) for c, m in result.best_checkpoints if key in m]
        if scored:
            pick = max if higher else min
            return pick(scored, key=lambda cm: cm[1][key])
    return result.checkpoint, result.metrics or {}


def _round(v: Any) -> Any:
    return round(v, 6) if isinstance(v, float) and math.isfinite(v) else v


def summarize_history(log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics history (training and evaluation points) and the facts the tests and the
    summary need from it: loss at the start and the end, throughput, resumptions."""
    history = [{k: _round(v) for k, v in e.items()} for e in log_history]
    train = [e for e in history if "loss" in e]
    evals = [e for e in history if "eval_loss" in e]
    speeds = [e["samples_per_second"] for e in train if e.get("samples_per_second")]
    return {
        "history": history,
        "loss_start": train[0]["loss"] if train else None,
        "loss_end": train[-1]["loss"] if train else None,
        "eval_loss_first": evals[0]["eval_loss"] if evals else None,
        "eval_loss_best": min(e["eval_loss"] for e in evals) if evals else None,
        "eval_hr@10_best": max((e["eval_hr@10"] for e in evals if "eval_hr@10" in e),
                               default=None),
        "samples_per_second": _round(sorted(speeds)[len(speeds) // 2]) if speeds else None,
        "resumed_from_steps": [e["resumed_from_step"] for e in history
                               if "resumed_from_step" in e],
    }


def export(result, out: str | Path, has_eval: bool, adapter: bool,
           selection: tuple[str, bool] = ("eval_loss", False)) -> dict[str, Any]:
    """Write ``<out>/adapter`` (LoRA runs) and ``<out>/merged`` from the chosen checkpoint;
    return the metrics history and where the exported weights came from."""
    out = Path(out)
    base_dir = out / MODEL_DIR
    checkpoint, metrics = choose_checkpoint(result, has_eval, *selection)
    latest_state = _trainer_state(result.checkpoint)
    for sub in (ADAPTER_DIR, MERGED_DIR, DENSE_DIR):
        shutil.rmtree(out / sub, ignore_errors=True)
    with checkpoint.as_directory() as d:
        hf = _hf_dir(d)
        step = json.loads((hf / "trainer_state.json").read_text())["global_step"]
        if (hf / DENSE_DIR).is_dir():  # the dense head of this checkpoint
            shutil.copytree(hf / DENSE_DIR, out / DENSE_DIR)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(load_model(base_dir, dtype="auto"), str(hf))
            model.save_pretrained(str(out / ADAPTER_DIR))
            merged = model.merge_and_unload()
        else:
            merged = load_model(hf, dtype="auto")
    merged.save_pretrained(str(out / MERGED_DIR))
    load_tokenizer(base_dir).save_pretrained(str(out / MERGED_DIR))
    info = summarize_history(latest_state["log_history"])
    info["exported"] = {"step": step, "global_steps": latest_state["global_step"],
                        "eval_loss": _round(metrics.get("eval_loss")),
                        selection[0]: _round(metrics.get(selection[0])),
                        "checkpoint": checkpoint.path}
    return info
