"""Stages 4-5 for real: the tiny preset on 2 CPU workers (gloo), TRL's SFTTrainer/DPOTrainer,
PEFT LoRA, Ray Train checkpoints and FailureConfig. No mocks.

Ray Train costs ~26 s per fit here, so the module runs two fits: SFT (with a worker crash
injected mid-run, which Ray Train recovers from the last checkpoint) and DPO on top of it;
every test reads their artifacts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_data import SID_VERSION, write_prompts  # noqa: E402

from leadre.artifacts import read_manifest  # noqa: E402

SFT_STEPS, SAVE_STEPS, FAIL_AT = 30, 10, 15
WORKERS = dict(num_workers=2, cpus_per_worker=0.5, device="cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("train_world"), n_users=200, seed=0)


@pytest.fixture(scope="module")
def sft_run(ray_local, world, tmp_path_factory):
    from leadre.train.config import SftConfig
    from leadre.train.sft import run

    out = tmp_path_factory.mktemp("sft")
    cfg = SftConfig(prompts_dir=str(world["prompts"]), out=str(out), preset="tiny",
                    finetune="lora", learning_rate=5e-3, warmup_ratio=0.0, batch_size=8, max_steps=SFT_STEPS,
                    logging_steps=5, save_steps=SAVE_STEPS, early_stopping_patience=5,
                    fail_at_step=FAIL_AT, max_failures=1, report_every=25, **WORKERS)
    return out, run(cfg)


@pytest.fixture(scope="module")
def dpo_run(sft_run, world, tmp_path_factory):
    from leadre.train.config import DpoConfig
    from leadre.train.dpo import run

    out = tmp_path_factory.mktemp("dpo")
    cfg = DpoConfig(prompts_dir=str(world["prompts"]), sft_dir=str(sft_run[0]), out=str(out),
                    learning_rate=2e-3, warmup_ratio=0.0, batch_size=8, max_steps=30,
                    logging_steps=5, save_steps=15, beta=0.1, **WORKERS)
    return out, run(cfg)


def test_sft_loss_falls_well_below_its_start(sft_run):
    _, m = sft_run
    t = m["training"]
    assert t["loss_start"] > 5.0  # ~ln(vocab): an untrained model
    assert t["loss_end"] < 0.4 * t["loss_start"], t
    assert t["eval_loss_best"] < 0.7 * t["eval_loss_first"], t
    curve = [e for e in m["history"] if "loss" in e]
    assert [e["step"] for e in curve] == [1, 5, 10, 15, 20, 25, 30]
    assert all("learning_rate" in e and e["samples_per_second"] > 0 for e in curve)


def _tensorboard_tags(directory: Path) -> set[str]:
    """The scalar tags in the TensorBoard event files of ``directory`` (TFRecord framing:
    length, its CRC, the Event proto, its CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for f in directory.glob("events.out.tfevents.*"):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            tags |= {v.tag for v in event.summary.value}
            i += 12 + n + 4
    return tags


def test_a_run_can_be_watched_while_it_trains(sft_run):
    """Rank 0 writes every logged point as it happens (progress.jsonl, TensorBoard events);
    the driver turns them into a progress line; the stage plots its curves at the end."""
    from leadre.train.common import progress_line

    out, m = sft_run
    points = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert any("loss" in p for p in points) and any("eval_loss" in p for p in points)
    assert all(p["max_steps"] == SFT_STEPS for p in points)
    # the selection metric, where the run decodes validation users, is a curve too
    hr = any("eval_hr@10" in e for e in m["history"])
    assert hr == any("eval_hr@10" in p for p in points)
    assert {"train/loss", "eval/loss"} | ({"eval/hr@10"} if hr else set()) <= \
        _tensorboard_tags(out / "tensorboard")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = progress_line("sft", points)
    assert line.startswith(f"sft: step {points[-1]['step']}/{SFT_STEPS}") and "loss" in line
    first = {"step": 0, "max_steps": 100, "time": 0.0, "loss": 9.0}
    assert progress_line("sft", [first, {**first, "step": 10, "time": 60.0, "loss": 4.0}]) == \
        "sft: step 10/100 (10%), loss 4, ~9 min left"


def test_killed_run_resumes_from_its_checkpoint_not_from_zero(sft_run):
    out, m = sft_run
    t = m["training"]
    # rank 0 raised at step 15; Ray Train restarted the group from the step-10 checkpoint
    assert t["resumed_from_steps"] == [SAVE_STEPS]
    assert t["exported"]["global_steps"] == SFT_STEPS
    steps = [e["step"] for e in m["history"] if "loss" in e]
    assert steps == sorted(set(steps))  # steps 1..10 were not trained twice
    # the checkpoints of the restarted attempt continue the first attempt's
    states = [json.loads(p.read_text())["global_step"]
              for p in (out / "ray" / "sft").glob("checkpoint_*/checkpoint/trainer_state.json")]
    assert sorted(states) == [10, 20, 30]


def test_sft_artifacts_follow_the_contract(sft_run, world):
    out, m = sft_run
    assert read_manifest(out, stage="sft")["sid_version"] == SID_VERSION == m["sid_version"]
    from leadre.prompts import trained_prompt_config

    assert trained_prompt_config(str(out)).max_events == 7  # serving prompts like training's
    assert (out / "adapter" / "adapter_config.json").exists()
    for sub in ("model", "merged"):
        assert (out / sub / "config.json").exists() and (out / sub / "tokenizer.json").exists()
    assert m["inputs"]["sids_dir"] == str(world["sids"]) and m["counts"]["over_max_length"] == 0
    assert m["training"]["exported"]["step"] == SFT_STEPS  # best eval loss = the last here
    assert m["summary"]["workers"] == "2 x cpu"


def test_merged_model_loads_with_plain_transformers_and_generates(sft_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from leadre.model.factory import load_for_inference, load_model
    from leadre.sids import parse_sid

    out, _ = sft_run
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    tok = PreTrainedTokenizerFast.from_pretrained(out / "merged")
    prompt = ("Assuming you are an ad recommendation system. The user is 30 years old; interests: "
              "tennis^4 times. Recent behaviour: 2 days ago^play short video^tennis highlights 7; "
              "1 days ago^click on ad^<a_0><b_1><c_2><d_0>. What ad will the user be interested "
              "in next time?")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        gen = merged.generate(**ids, max_new_tokens=6, do_sample=False,
                              pad_token_id=tok.pad_token_id)
    answer = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    # 30 steps teach the format (the category itself takes longer): a whole 4-level S-ID, then EOS
    assert [p for p, _ in parse_sid(answer)] == ["a", "b", "c", "d"], answer
    # adapter + base model == merged model
    with_adapter = PeftModel.from_pretrained(load_model(out / "model"), out / "adapter").eval()
    with torch.no_grad():
        a = with_adapter(**ids).logits
        b = merged(**ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    model, tokenizer = load_for_inference(out)
    assert tokenizer.padding_side == "left" and not model.training


def test_dpo_raises_the_reward_margin_on_heldout_pairs(dpo_run):
    out, m = dpo_run
    h = m["training"]["heldout"]
    assert h["split"] == "test" and h["pairs"] > 10
    assert h["logp_margin_after"] > h["logp_margin_before"] + 1.0, h
    assert h["reward_margin"] > 0.1 and h["accuracy_after"] > h["accuracy_before"], h
    evals = [e for e in m["history"] if "eval_rewards/margins" in e]
    assert evals and evals[-1]["eval_rewards/margins"] > 0
    loss = [e["loss"] for e in m["history"] if "loss" in e]
    assert loss[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference (SFT) at the start


def test_dpo_starts_from_the_sft_adapter_and_exports_the_same_layout(dpo_run, sft_run):
    from leadre.model.factory import load_for_inference

    out, m = dpo_run
    assert read_manifest(out, stage="dpo")["inputs"]["start"] == "sft adapter"
    assert read_manifest(out, stage="dpo")["prompt_config"] == {"max_events": 7}
    for sub in ("model", "adapter", "merged"):
        assert (out / sub).is_dir()
    # the DPO adapter applies to the same base model as the SFT adapter
    assert (out / "model" / "model.safetensors").read_bytes() == \
        (sft_run[0] / "model" / "model.safetensors").read_bytes()
    model, tokenizer = load_for_inference(out)
    assert model.config.vocab_size == len(tokenizer)


def test_relative_paths_reach_workers_absolute(tmp_path, monkeypatch):
    """Ray Train workers run in their own working directory (the demo failed on this)."""
    from leadre.train.config import DpoConfig
    from leadre.train.config import SftConfig

    monkeypatch.chdir(tmp_path)
    sft = SftConfig(prompts_dir="runs/prompts", out="runs/sft")
    assert sft.prompts_dir == str(tmp_path / "runs/prompts") and sft.out == str(tmp_path / "runs/sft")
    dpo = DpoConfig(prompts_dir="p", sft_dir="runs/sft", out="o")
    assert dpo.sft_dir == str(tmp_path / "runs/sft")
    assert SftConfig(prompts_dir="s3://bucket/prompts", out="o").prompts_dir == "s3://bucket/prompts"


def test_dpo_pair_types_select_the_pairs_trained_on(tmp_path):
    from leadre.config import ConfigError
    from leadre.train.config import DpoConfig
    from leadre.train.dpo import COLUMNS
    from leadre.train.common import load_split

    prompts = str(write_prompts(tmp_path, n_users=20)["prompts"])
    every = load_split(prompts, "dpo", "train", COLUMNS)
    assert every.num_rows > 0
    assert load_split(prompts, "dpo", "train", COLUMNS, tasks=["value"]).num_rows == every.num_rows
    assert load_split(prompts, "dpo", "train", COLUMNS, tasks=["interest_hard"]).num_rows == 0
    assert DpoConfig(pair_types=["value"]).pair_types == ["value"]
    for bad in (["ecpm"], []):
        with pytest.raises(ConfigError, match="pair_types"):
            DpoConfig(pair_types=bad)
