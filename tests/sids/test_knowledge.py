"""Knowledge that reaches the model (issue 23): content titles in the ads' frozen space,
their knowledge tokens in the prompts, S-ID rows started from codebook vectors, and the
encoder version that later stages check.

Real components: the synthetic world through the real ingest, the real packaged MiniLM on a
Ray Data actor pool, real quantisers, the real prompts stage, real transformers models."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pytest

from leadre.artifacts import ArtifactError, read_manifest, read_table, write_table
from leadre.cli import main
from leadre.config import from_dict
from leadre.data.config import IngestConfig, SynthConfig
from leadre.prompts import PromptConfig
from leadre.prompts.contract import read_split
from leadre.runtime import RayConfig
from leadre.sids import SidConfig
from leadre.sids.ann import load_embeddings
from leadre.sids.build import load_code_vectors
from leadre.sids.content import TITLES, ContentCodes, fallback_vector
from leadre.sids.packaged import ENCODERS
from leadre.stages import run_stage

from packaged_models import require_installed

BAD_TITLES = {"": "empty", "x" * 600: "too_long", "caf\ufffd video": "undecodable"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """A small synthetic world, ingested, and its S-IDs built with the packaged MiniLM (the
    default encoder) on a Ray Data actor pool."""
    require_installed(ENCODERS["all-minilm-l6-v2"])
    tmp = tmp_path_factory.mktemp("knowledge")
    ray = RayConfig(num_cpus=2)
    run_stage("generate", SynthConfig(out=str(tmp / "world"), users=120, ads=80, seed=0))
    run_stage("ingest", IngestConfig(input_dir=str(tmp / "world"), out=str(tmp / "ingest"),
                                     ray=ray))
    sids = run_stage("sids", SidConfig(ingest_dir=str(tmp / "ingest"), out=str(tmp / "sids"),
                                       quantizer="rqkmeans", seed=0, ray=ray))
    return tmp, sids


def test_content_titles_are_encoded_into_the_ads_space(world):
    tmp, manifest = world
    sids = str(tmp / "sids")
    titles = read_table(sids, TITLES)
    events = read_table(str(tmp / "ingest"), "events")
    content = events.filter(pa.compute.not_equal(events.column("domain"), "ad"))
    assert set(titles.column("title").to_pylist()) == set(content.column("title").to_pylist())
    assert manifest["quality"]["titles"]["encoded"] == titles.num_rows
    assert manifest["encoder_version"].startswith("hf:all-minilm-l6-v2:")
    ad_ids, ad_emb = load_embeddings(sids)
    assert ad_emb.shape[1] == 384  # MiniLM, not LSA
    emb = np.stack(titles.column("embedding").to_numpy(zero_copy_only=False))
    # one space: a video title's nearest ad is usually of the category it is about
    ads = read_table(str(tmp / "ingest"), "ads")
    cat = dict(zip(ads.column("ad_id").to_pylist(), ads.column("category").to_pylist()))
    words = {c: c.split("_")[0] for c in set(cat.values())}
    hits = total = 0
    for i, t in enumerate(titles.column("title").to_pylist()):
        named = [c for c, w in words.items() if t and w in t.lower()]
        if len(named) == 1:
            total += 1
            hits += cat[ad_ids[int(np.argmax(ad_emb @ emb[i]))]] == named[0]
    assert total >= 10 and hits / total > 0.6, (hits, total)


def test_unusable_titles_get_the_fallback_vector_and_are_counted(world, tmp_path):
    tmp, _ = world
    shutil.copytree(tmp / "ingest", tmp_path / "ingest")
    events = read_table(str(tmp_path / "ingest"), "events")
    content = events.filter(pa.compute.not_equal(events.column("domain"), "ad"))
    planted = content.slice(0, len(BAD_TITLES)).set_column(
        events.schema.get_field_index("title"), "title", pa.array(list(BAD_TITLES)))
    write_table(pa.concat_tables([events, planted]), str(tmp_path / "ingest"), "events")
    m = run_stage("sids", SidConfig(ingest_dir=str(tmp_path / "ingest"), out=str(tmp_path / "s"),
                                    quantizer="rqkmeans", embed_on="local", seed=0))
    assert m["quality"]["titles"]["fallback"] == {"empty": 1, "too_long": 1, "undecodable": 1}
    assert m["summary"]["title_fallbacks"] == 3
    titles = read_table(str(tmp_path / "s"), TITLES)
    emb = np.stack(titles.column("embedding").to_numpy(zero_copy_only=False))
    by_title = dict(zip(titles.column("title").to_pylist(), range(titles.num_rows)))
    _, ad_emb = load_embeddings(str(tmp_path / "s"))
    for bad, reason in BAD_TITLES.items():
        assert titles.column("fallback")[by_title[bad]].as_py() == reason
        np.testing.assert_allclose(emb[by_title[bad]], fallback_vector(ad_emb), atol=1e-6)
    assert titles.column("fallback").null_count == titles.num_rows - 3


@pytest.fixture(scope="module")
def prompt_builds(world):
    """The world's prompts built twice: content as knowledge tokens (code) and as titles."""
    tmp, _ = world
    outs = {}
    for mode in ("code", "title"):
        out = tmp / f"prompts_{mode}"
        outs[mode] = run_stage("prompts", from_dict(PromptConfig, {
            "ingest_dir": str(tmp / "ingest"), "sids_dir": str(tmp / "sids"), "out": str(out),
            "content_object": mode, "ray": RayConfig(num_cpus=2)}))
    return outs


def test_prompts_show_content_events_as_knowledge_tokens(world, prompt_builds):
    tmp, _ = world
    codes = ContentCodes.from_sids_dir(str(tmp / "sids"), 2, list("abcde"))
    outs = {}
    for mode, m in prompt_builds.items():
        assert m["encoder_version"] == read_manifest(str(tmp / "sids"))["encoder_version"]
        outs[mode] = read_split(str(tmp / f"prompts_{mode}"), "sft", "train",
                                ["prompt"]).column("prompt").to_pylist()
    video = re.compile(r"play short video\^([^;.]*)")
    assert len(outs["code"]) == len(outs["title"])
    compared = 0
    for p_code, p_title in zip(outs["code"], outs["title"]):
        coded, worded = video.findall(p_code), video.findall(p_title)
        assert all(re.fullmatch(r"<a_\d+><b_\d+>", o) for o in coded)
        assert not any(re.search(r"<a_\d+>", w) for w in worded)
        if len(coded) == len(worded):  # (titles take more tokens: more are truncated away)
            assert [codes.code(w) for w in worded] == coded
            compared += len(coded)
    assert compared > 500


def test_generator_codes_titles_it_has_never_seen_like_the_stage_does(world):
    tmp, _ = world
    sids = str(tmp / "sids")
    codes = ContentCodes.from_sids_dir(sids, 2, list("abcde")).attach(sids)
    known = next(t for t in codes.codes if t and t in codes.codes and "video" not in t)
    fresh = ContentCodes({}, list("abcde"), 2).attach(sids)  # nothing known: must encode
    assert fresh.add_unseen([known, None, ""]) == 1
    assert fresh.code(known) == codes.code(known)
    assert codes.add_unseen(["a brand-new documentary about electric cars"]) == 1
    assert re.fullmatch(r"<a_\d+><b_\d+>", codes.code("a brand-new documentary about electric cars"))


def test_sid_rows_start_from_codebook_vectors(world, tmp_path):
    """From scratch (a preset) and for a pretrained HF model: the rows of codes whose vectors
    are close start closer than the rows of codes whose vectors are far apart."""
    from leadre.model.factory import load_model, load_tokenizer, prepare_base_model
    from leadre.sids import load_table

    from _tiny_lm import tiny_model, tiny_tokenizer

    tmp, _ = world
    table = load_table(str(tmp / "sids"))
    vectors = load_code_vectors(str(tmp / "sids"))
    level_a = [t for t in vectors if t.startswith("<a_")]
    assert len(vectors) == sum(table.codebook_sizes[:-1])
    hf_dir = tmp_path / "hf"
    tok = tiny_tokenizer([])
    tiny_model(len(tok)).save_pretrained(str(hf_dir))
    tok.save_pretrained(str(hf_dir))
    for name, base in (("preset", None), ("pretrained", str(hf_dir))):
        out = tmp_path / name
        info = prepare_base_model(out, sid_tokens=table.tokens(), base_model=base,
                                  preset="tiny", corpus=["click on ad"] * 20, seed=0,
                                  sid_vectors=vectors)
        assert info["sid_init"] == "codebook"
        model, tok_out = load_model(out), load_tokenizer(out)
        w = model.get_input_embeddings().weight.detach().numpy()
        ids = tok_out.convert_tokens_to_ids(level_a)
        rows = w[ids] / np.linalg.norm(w[ids], axis=1, keepdims=True)
        vec = np.stack([vectors[t] for t in level_a])
        vec = vec - vec.mean(0)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        model_sim, code_sim = rows @ rows.T, vec @ vec.T
        iu = np.triu_indices(len(level_a), 1)
        assert np.corrcoef(model_sim[iu], code_sim[iu])[0, 1] > 0.9, name
        # S-ID rows have the norm of the vocabulary's rows, not of the code vectors
        sid_ids = set(tok_out.convert_tokens_to_ids(table.tokens()))
        vocab_rows = [i for i in range(len(tok_out)) if i not in sid_ids]
        norm = np.linalg.norm(w[vocab_rows], axis=1).mean()
        assert np.linalg.norm(w[ids], axis=1).mean() == pytest.approx(norm, rel=0.05)


@pytest.fixture(scope="module")
def lsa_sids(world):
    """The same world's S-IDs from another encoder (LSA)."""
    tmp, _ = world
    run_stage("sids", SidConfig(ingest_dir=str(tmp / "ingest"), out=str(tmp / "sids_lsa"),
                                encoder="lsa", quantizer="rqkmeans", embed_on="local", seed=0))
    return tmp / "sids_lsa"


def test_a_prompts_dir_of_another_encoder_is_refused_before_training(world, prompt_builds,
                                                                     lsa_sids, tmp_path, capsys):
    tmp, _ = world
    lsa = lsa_sids
    code = main(["sft", "--prompts-dir", str(tmp / "prompts_code"), "--sids-dir", str(lsa),
                 "--out", str(tmp_path / "sft"), "--preset", "tiny", "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2
    minilm = read_manifest(str(tmp / "sids"))["encoder_version"]
    other = read_manifest(str(lsa))["encoder_version"]
    assert minilm in err and other in err and other.startswith("lsa:"), err
    assert not (tmp_path / "sft" / "model").exists()  # refused before any work
    with pytest.raises(ArtifactError, match="text encoder"):
        from leadre.eval.config import EvalConfig
        run_stage("eval", from_dict(EvalConfig, {
            "prompts_dir": str(tmp / "prompts_code"), "sids_dir": str(lsa),
            "out": str(tmp_path / "eval"), "model_dir": None, "baselines": ["most_popular"],
            "generate_on": "local"}))


def test_knowledge_tokens_through_sft_dpo_eval_and_the_generator(world, prompt_builds,
                                                                  lsa_sids, tmp_path):
    """The real TRL trainers on Ray Train learn from knowledge-token prompts with S-ID rows
    started from the codebooks; eval decodes only valid S-IDs; the serving generator shows a
    video title it has never seen as its knowledge token, the way training did."""
    from leadre.eval.config import EvalConfig
    from leadre.index.context import build_prompt
    from leadre.model.config import GenerationConfig
    from leadre.serve import GeneratorConfig, ServePaths
    from leadre.serve.generator import GeneratorCore
    from leadre.train.config import DpoConfig, SftConfig

    tmp, sids_manifest = world
    sids, prompts = str(tmp / "sids"), str(tmp / "prompts_code")
    ray = RayConfig(num_cpus=2)
    workers = dict(num_workers=2, cpus_per_worker=0.5, device="cpu", ray=ray)
    sft = run_stage("sft", SftConfig(prompts_dir=prompts, out=str(tmp_path / "sft"),
                                     preset="tiny", max_steps=6, batch_size=4, save_steps=6,
                                     logging_steps=3, selection_rows=16, **workers))
    assert sft["model"]["sid_init"] == "codebook"
    assert sft["encoder_version"] == sids_manifest["encoder_version"]
    assert sft["prompt_config"]["content_object"] == "code"
    # the dense head trained beside the S-ID loss and its fusion weight was tuned on valid
    assert any("dense_loss" in point for point in sft["history"])
    head = json.loads((tmp_path / "sft" / "dense" / "head.json").read_text())
    assert head["encoder_version"] == sids_manifest["encoder_version"] and head["dim"] == 384
    assert sft["training"]["fusion"]["rows"] > 0
    assert head["fusion_weight"] == sft["training"]["fusion"]["weight"]
    ads = json.loads((tmp_path / "sft" / "dense" / "trained_ads.json").read_text())
    assert set(ads["dense_holdout"]) < set(ads["trained"])  # stand-ins for unseen ads
    dpo = run_stage("dpo", DpoConfig(prompts_dir=prompts, sft_dir=str(tmp_path / "sft"),
                                     out=str(tmp_path / "dpo"), max_steps=2, batch_size=4,
                                     save_steps=2, logging_steps=1, **workers))
    assert dpo["encoder_version"] == sids_manifest["encoder_version"]
    assert (tmp_path / "dpo" / "dense" / "head.safetensors").exists()
    assert "weight" in dpo["training"]["fusion"]
    # a model is refused next to S-IDs of another encoder, naming both (eval, warm, serve)
    from leadre.artifacts import check_model
    from leadre.sids import load_table

    with pytest.raises(ArtifactError, match=f"text encoder {sids_manifest['encoder_version']}"
                       f".*encoder lsa:"):
        check_model(str(tmp_path / "dpo"), load_table(str(lsa_sids)).version, str(lsa_sids))
    ev = run_stage("eval", EvalConfig(prompts_dir=prompts, model_dir=str(tmp_path / "dpo"),
                                      out=str(tmp_path / "eval"), baselines=[], max_rows=20,
                                      generation=GenerationConfig(beam_size=10), ray=ray))
    # the fused ranking under the model's name, the beam alone beside it, both valid S-IDs
    assert ev["summary"]["invalid_rate"] == {"leadre-dpo": 0.0, "leadre-dpo-beam": 0.0}
    # a dense head trained on another encoder's vectors fails at load, naming both
    from leadre.model.decode import SidGenerator

    shutil.copytree(tmp_path / "dpo", tmp_path / "dpo_other")
    meta = tmp_path / "dpo_other" / "dense" / "head.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "encoder_version": "lsa:x"}))
    with pytest.raises(ArtifactError, match=f"encoder lsa:x.*encoder "
                       f"{sids_manifest['encoder_version']}"):
        SidGenerator.from_stage_dir(str(tmp_path / "dpo_other"), sids)

    core = GeneratorCore(GeneratorConfig(), ServePaths(sids, f"sqlite:///{tmp_path / 's.db'}",
                                                       model_dir=str(tmp_path / "dpo")))
    assert core.prompt_cfg.content_object == "code"
    new = "a never seen video about charging an electric car"
    ad = load_embeddings(sids)[0][0]
    ctx = {"events": [{"ts": 1.7e9, "domain": "ad", "action": "click", "ad_id": ad},
                      {"ts": 1.7e9 + 60, "domain": "video", "action": "play", "title": new}]}
    content_of = core.content_of([ctx])
    code = core.content.code(new)
    assert re.fullmatch(r"<a_\d+><b_\d+>", code)
    assert f"play short video^{code}" in build_prompt(ctx, core.table, cfg=core.prompt_cfg,
                                                       content_of=content_of)
    assert core.llm.fused and len(core.candidates([ctx])[0]) > 0
