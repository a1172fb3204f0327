"""The full fine-tune switch and resuming a finished/killed run by re-submitting it
(``resume=true``: Ray Train restores the run from ``<out>/ray``). Two extra Ray Train fits
(~1.5 min on 2 cores), hence ``slow``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_data import write_prompts  # noqa: E402


@pytest.mark.slow
def test_full_finetune_then_resubmitted_run_continues_from_storage(ray_local, tmp_path):
    from leadre.train.model import load_for_inference
    from leadre.train.sft import SftConfig, run

    world = write_prompts(tmp_path / "w", n_users=60, seed=1)
    common = dict(prompts_dir=str(world["prompts"]), out=str(tmp_path / "sft"), preset="tiny",
                  finetune="full", learning_rate=3e-3, batch_size=8, save_steps=4,
                  logging_steps=2, num_workers=1, cpus_per_worker=0.5, device="cpu")
    first = run(SftConfig(max_steps=4, **common))
    assert not (tmp_path / "sft" / "adapter").exists()
    assert first["training"]["exported"]["global_steps"] == 4
    second = run(SftConfig(max_steps=8, resume=True, **common))
    t = second["training"]
    assert t["resumed_from_steps"] == [4] and t["exported"]["global_steps"] == 8
    assert [e["step"] for e in second["history"] if "loss" in e] == [1, 2, 4, 6, 8]
    model, tok = load_for_inference(tmp_path / "sft")
    assert model.config.vocab_size == len(tok)
