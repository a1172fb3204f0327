"""Stage 2 (Semantic IDs): uniqueness, inverse lookup, determinism, BYO index, bad input.

Real components throughout: a real encoder, real quantisers, real parquet artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from leadre.artifacts import ArtifactError, read_table, write_manifest, write_table
from leadre.cli import main
from leadre.config import ConfigError, from_dict
from leadre.data.schema import ADS
from leadre.sids import SidConfig, SidTable, SidTrie, load_table, load_trie, run
from leadre.sids.encoder import LsaEncoder, ad_texts, load_encoder
from leadre.sids.quantize import CODEBOOKS_FILE, RqKMeans, RqVae, load_quantizer
from leadre.sids.report import collision_stats, level_stats, same_category_rate

from conftest import DATASETS

CATEGORY_WORDS = {
    "shoes": "running trail sneaker leather boot sole lace heel",
    "phones": "smartphone screen battery camera android charger case",
    "coffee": "espresso beans roast arabica grinder brew mug",
    "garden": "hose shovel seeds soil planter rake fertilizer",
    "travel": "flight hotel suitcase beach resort passport tour",
    "books": "novel paperback author mystery fantasy chapter edition",
}


def synthetic_ads(n: int = 400, seed: int = 0, dup_share: float = 0.1) -> pa.Table:
    """A catalog in the shape the synthetic world produces: category-coherent titles and
    descriptions; some ads share their text exactly (forces quantiser collisions)."""
    rng = np.random.default_rng(seed)
    cats = list(CATEGORY_WORDS)
    rows = {k: [] for k in ADS.names}
    for i in range(n):
        c = cats[i % len(cats)]
        if i >= len(cats) and rng.random() < dup_share:
            j = int(rng.integers(0, i))  # exact text duplicate of an earlier ad
            title, desc, c = rows["title"][j], rows["description"][j], rows["category"][j]
        else:
            words = CATEGORY_WORDS[c].split()
            title = " ".join(rng.choice(words, 3)) + f" model {int(rng.integers(100))}"
            desc = " ".join(rng.choice(words, 8))
        rows["ad_id"].append(f"ad{i:05d}")
        rows["title"].append(title)
        rows["description"].append(desc)
        rows["category"].append(c)
        rows["advertiser"].append(f"adv{i % 17}")
        rows["ecpm"].append(float(rng.gamma(2.0, 1.0)))
        rows["active"].append(bool(rng.random() < 0.8))
    return pa.table(rows, schema=ADS)


def make_ingest(directory: Path, ads: pa.Table) -> str:
    write_table(ads, str(directory), "ads")
    write_manifest(str(directory), "ingest", inputs={}, config={},
                   counts={"ads": ads.num_rows}, timings={})
    return str(directory)


def fast_cfg(ingest: str, out: Path, **kw) -> SidConfig:
    base = dict(ingest_dir=ingest, out=str(out), encoder="lsa", quantizer="rqkmeans",
                embed_on="local", embed_dim=32)
    return SidConfig(**{**base, **kw})


def assert_unique_and_invertible(table: SidTable) -> None:
    sids = table.sids(table.ad_id_array)
    assert len(set(sids)) == len(sids), "S-IDs must be unique"
    assert table.ad_ids(sids) == table.ad_id_array.tolist()
    for a in table.ad_id_array[:50]:
        assert table.ad_id(table.sid(a)) == a
        assert table.ad_id(table.sid_tokens(a)) == a  # token-list form works too
    vocab = set(table.tokens())
    assert all(t in vocab for s in sids[:200] for t in table.sid_tokens(table.ad_id(s)))


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sids_synth")
    ads = synthetic_ads()
    cfg = fast_cfg(make_ingest(tmp / "ingest", ads), tmp / "out")
    return ads, cfg, run(cfg)


# ---------------------------------------------------------------------------------------
# Uniqueness, inverse lookup, artifacts


def test_synthetic_sids_unique_and_invertible(synth_run):
    ads, cfg, manifest = synth_run
    table = load_table(cfg.out)
    assert len(table) == ads.num_rows
    assert_unique_and_invertible(table)
    assert manifest["stage"] == "sids" and manifest["version"] == table.version
    q = manifest["quality"]
    assert q["unique_sids"] is True
    # The duplicated texts collide before disambiguation, and the e level resolves them.
    assert q["collisions_before_disambiguation"]["collision_rate"] > 0
    assert table.codebook_sizes[-1] >= 2
    assert [lvl["level"] for lvl in q["levels"]] == list(range(cfg.levels))
    assert all(0 < lvl["utilisation"] <= 1 for lvl in q["levels"])
    assert np.array_equal(table.active, ads.column("active").to_numpy(zero_copy_only=False))
    s = table.sid(table.ad_id_array[0])
    assert s.startswith("<a_") and "<e_" in s and " " not in s


def test_artifacts_written_and_reloadable(synth_run):
    ads, cfg, _ = synth_run
    out = Path(cfg.out)
    assert (out / CODEBOOKS_FILE).exists() and (out / "sid_config.json").exists()
    q = load_quantizer(cfg.out)
    emb = read_table(cfg.out, "embeddings")
    x = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    # Re-encoding with the saved encoder + codebooks reproduces the stored codes.
    enc = load_encoder(str(out / "encoder"))
    np.testing.assert_allclose(enc.encode(ad_texts(ads)), x, atol=1e-5)
    table = load_table(cfg.out)
    assert np.array_equal(q.encode(x), table.codes[:, :-1])
    assert json.loads((out / "sid_config.json").read_text())["quantizer"] == "rqkmeans"


def test_disambiguation_is_by_ad_id_not_row_order():
    codes = np.array([[1, 2], [1, 2], [0, 0], [1, 2]])
    ids = ["c", "a", "z", "b"]
    t1 = SidTable.from_codes(ids, codes, [3, 3])
    perm = [3, 0, 2, 1]
    t2 = SidTable.from_codes([ids[i] for i in perm], codes[perm], [3, 3])
    assert t1.sids(ids) == t2.sids(ids)
    assert t1.sid("a") == "<a_1><b_2><c_0>" and t1.sid("c") == "<a_1><b_2><c_2>"
    assert t1.ad_ids(["<a_9><b_2><c_0>", "garbage", "<a_1><b_2>"]) == [None, None, None]
    with pytest.raises(KeyError):
        t1.ad_id("<a_0><b_0><c_1>")


def test_determinism_same_seed_same_sids(tmp_path):
    ingest = make_ingest(tmp_path / "ingest", synthetic_ads(200, seed=3))
    m1 = run(fast_cfg(ingest, tmp_path / "a"))
    m2 = run(fast_cfg(ingest, tmp_path / "b"))
    m3 = run(fast_cfg(ingest, tmp_path / "c", seed=1))
    t1, t2 = load_table(str(tmp_path / "a")), load_table(str(tmp_path / "b"))
    assert m1["version"] == m2["version"] != m3["version"]
    assert t1.sids(t1.ad_id_array) == t2.sids(t1.ad_id_array)


def test_rqvae_deterministic_and_no_dead_codes():
    x = LsaEncoder(16).fit(ad_texts(synthetic_ads(300))).encode(ad_texts(synthetic_ads(300)))
    kw = dict(latent_dim=8, hidden_dims=[32], epochs=15, batch_size=64, device="cpu")
    a, b = RqVae(3, 8, seed=5, **kw).fit(x), RqVae(3, 8, seed=5, **kw).fit(x)
    assert np.array_equal(a.encode(x), b.encode(x))
    assert np.array_equal(a.codebooks(), b.codebooks())
    assert a.history[-1]["recon"] < a.history[0]["recon"]  # it learns
    # k-means init + dead-code reset keep the codebooks in use (the data has 6 topics, so
    # one of 8 first-level codes may legitimately go idle).
    assert all(lvl["utilisation"] >= 0.75 for lvl in level_stats(a.encode(x), a.codebook_sizes))
    c = RqVae(3, 8, seed=6, **kw).fit(x)
    assert not np.array_equal(a.codebooks(), c.codebooks())


def test_rqvae_stage_on_ray(ray_local, tmp_path):
    ads = synthetic_ads(240, seed=7)
    cfg = SidConfig(ingest_dir=make_ingest(tmp_path / "ingest", ads), out=str(tmp_path / "out"),
                    encoder="lsa", embed_on="ray", embed_actors=2, embed_batch_size=64, embed_dim=24,
                    quantizer="rqvae", levels=3, epochs=10, batch_size=64, latent_dim=8,
                    hidden_dims=[32])
    manifest = run(cfg)
    table = load_table(cfg.out)
    assert_unique_and_invertible(table)
    assert manifest["counts"]["ads"] == 240 and len(table.prefixes) == 4
    # Ray Data returns embeddings in catalog order (rows are realigned by index).
    emb = read_table(cfg.out, "embeddings")
    assert emb.column("ad_id").to_pylist() == ads.column("ad_id").to_pylist()
    local = load_encoder(str(Path(cfg.out) / "encoder")).encode(ad_texts(ads))
    np.testing.assert_allclose(np.stack(emb.column("embedding").to_numpy(zero_copy_only=False)),
                               local, atol=1e-5)
    assert load_quantizer(cfg.out).kind == "rqvae"


def test_cli_and_trie_from_stage_output(synth_run, capsys):
    _, cfg, _ = synth_run
    trie = load_trie(cfg.out)
    table = trie.table
    first = trie.next_tokens([])
    active_first = {table.codes[r, 0] for r in np.flatnonzero(table.active)}
    expect = sorted(table.token(0, c) for c in active_first)
    assert sorted(table.tokens()[i] for i in first) == expect


def test_cli_runs_stage(tmp_path, capsys):
    ingest = make_ingest(tmp_path / "ingest", synthetic_ads(120))
    rc = main(["sids", "--ingest-dir", ingest, "--out", str(tmp_path / "out"),
               "--encoder", "lsa", "--quantizer", "rqkmeans", "--embed-on", "local",
               "--levels", "3", "--set", "embed_dim=16"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ads"] == 120 and len(summary["codebook_sizes"]) == 4


# ---------------------------------------------------------------------------------------
# Real data


@pytest.fixture(scope="module")
def scientific_ads():
    path = DATASETS / "scientific" / "Scientific.item.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    items = json.loads(path.read_text())
    rows = {k: [] for k in ADS.names}
    for item_id, v in items.items():
        path_ = v.get("categories", "").split(",")
        rows["ad_id"].append(item_id)
        rows["title"].append(v["title"])
        rows["description"].append(v.get("description"))
        rows["category"].append(path_[1] if len(path_) > 1 else path_[0])
        rows["advertiser"].append(v.get("brand"))
        rows["ecpm"].append(1.0)
        rows["active"].append(True)
    return pa.table(rows, schema=ADS)


def test_scientific_unique_and_semantic(tmp_path, scientific_ads):
    cfg = fast_cfg(make_ingest(tmp_path / "ingest", scientific_ads), tmp_path / "out",
                   embed_dim=64)
    manifest = run(cfg)
    table = load_table(cfg.out)
    assert len(table) == scientific_ads.num_rows == 4344
    assert_unique_and_invertible(table)
    purity = manifest["quality"]["first_level_same_category"]
    assert purity["same_code_pairs"] > 3 * purity["random_pairs"]


def test_byo_index_beauty(tmp_path):
    path = DATASETS / "beauty" / "Beauty.index.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    raw = json.loads(path.read_text())
    manifest = run(SidConfig(index_json=str(path), out=str(tmp_path / "out")))
    table = load_table(str(tmp_path / "out"))
    assert len(table) == len(raw) == 12101
    assert table.prefixes == ["a", "b", "c", "d", "e"]
    assert_unique_and_invertible(table)
    for item in ["0", "17", "12100"]:
        assert table.sid(item) == "".join(raw[item]) + "<e_0>"  # already collision-free
    assert manifest["quality"]["collisions_before_disambiguation"]["collision_rate"] == 0
    assert SidTable.from_index_json(path).version == table.version  # content-addressed


def test_byo_index_with_collisions_and_active_flags(tmp_path):
    idx = {"x": ["<a_1>", "<b_2>"], "y": ["<a_1>", "<b_2>"], "z": ["<a_0>", "<b_0>"]}
    p = tmp_path / "Tiny.index.json"
    p.write_text(json.dumps(idx))
    ads = synthetic_ads(3).set_column(0, "ad_id", pa.array(["x", "y", "z"]))
    ads = ads.set_column(6, "active", pa.array([True, False, True]))
    run(SidConfig(index_json=str(p), ingest_dir=make_ingest(tmp_path / "ing", ads),
                  out=str(tmp_path / "out")))
    t = load_table(str(tmp_path / "out"))
    assert t.sids(["x", "y", "z"]) == ["<a_1><b_2><c_0>", "<a_1><b_2><c_1>", "<a_0><b_0><c_0>"]
    assert t.active.tolist() == [True, False, True]


# ---------------------------------------------------------------------------------------
# Bad input -> clear errors, never a traceback


def test_empty_titles_rejected(tmp_path, capsys):
    ads = synthetic_ads(30)
    titles = ads.column("title").to_pylist()
    titles[4] = "   "
    ingest = make_ingest(tmp_path / "ingest", ads.set_column(1, "title", pa.array(titles)))
    with pytest.raises(ArtifactError, match="empty title.*ad00004"):
        run(fast_cfg(ingest, tmp_path / "out"))
    assert main(["sids", "--ingest-dir", ingest, "--out", str(tmp_path / "o2")]) == 2
    assert "empty title" in capsys.readouterr().err


def test_duplicate_ad_ids_rejected(tmp_path):
    ads = synthetic_ads(30)
    ids = ads.column("ad_id").to_pylist()
    ids[7] = ids[3]
    ingest = make_ingest(tmp_path / "ingest", ads.set_column(0, "ad_id", pa.array(ids)))
    with pytest.raises(ArtifactError, match="duplicate ad_id.*ad00003"):
        run(fast_cfg(ingest, tmp_path / "out"))
    with pytest.raises(ArtifactError, match="duplicate ad_id"):
        SidTable.from_codes(["a", "a"], np.zeros((2, 2)), [2, 2])


def test_missing_or_wrong_inputs(tmp_path):
    with pytest.raises(ArtifactError, match="nowhere does not exist .expected the output of "
                                            "stage 'ingest'"):
        run(fast_cfg(str(tmp_path / "nowhere"), tmp_path / "out"))
    empty = make_ingest(tmp_path / "empty", ADS.empty_table())
    with pytest.raises(ArtifactError, match="empty"):
        run(fast_cfg(empty, tmp_path / "out"))
    bad = tmp_path / "bad.index.json"
    for content in ("{not json", "[]", json.dumps({"1": ["a_1", "b_2"]}),
                    json.dumps({"1": ["<a_1>"], "2": ["<a_1>", "<b_1>"]})):
        bad.write_text(content)
        with pytest.raises(ArtifactError, match="index file"):
            SidTable.from_index_json(bad)


def test_corrupt_codebook_file(synth_run, tmp_path):
    _, cfg, _ = synth_run
    good = (Path(cfg.out) / CODEBOOKS_FILE).read_bytes()
    for name, content in [("truncated", good[: len(good) // 2]), ("garbage", b"\x00" * 64),
                          ("empty", b"")]:
        d = tmp_path / name
        d.mkdir()
        (d / CODEBOOKS_FILE).write_bytes(content)
        with pytest.raises(ArtifactError, match="corrupt"):
            load_quantizer(str(d))
    with pytest.raises(ArtifactError, match="does not exist"):
        load_quantizer(str(tmp_path))


def test_corrupt_sid_table(synth_run, tmp_path):
    _, cfg, _ = synth_run
    t = read_table(cfg.out, "sid_table").replace_schema_metadata(None)
    write_table(t, str(tmp_path), "sid_table")
    with pytest.raises(ArtifactError, match="metadata"):
        SidTable.load(str(tmp_path))
    with pytest.raises(ArtifactError, match="nothing does not exist .expected the output of "
                                            "stage 'sids'"):
        load_table(str(tmp_path / "nothing"))
    with pytest.raises(ArtifactError, match="expected 'sids'"):
        load_table(cfg.ingest_dir)


def test_config_errors():
    with pytest.raises(ConfigError, match="ingest_dir"):
        SidConfig()
    with pytest.raises(ConfigError, match="model_path"):
        SidConfig(ingest_dir="x", encoder="hf", model_path=None)
    assert SidConfig(ingest_dir="x").model_path == "all-minilm-l6-v2"  # the default encoder
    with pytest.raises(ConfigError, match="levels"):
        SidConfig(ingest_dir="x", levels=0)
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(SidConfig, {"ingest_dir": "x", "quantizer": "vqvae"})
    assert SidConfig(ingest_dir="x").codes_for(4344) == 128
    assert SidConfig(ingest_dir="x").codes_for(10) == 8
    assert SidConfig(ingest_dir="x").codes_for(10_000_000) == 256
    assert SidConfig(ingest_dir="x", codebook_size=64).codes_for(10) == 64


# ---------------------------------------------------------------------------------------
# Encoders and reports


def test_lsa_encoder_captures_similarity_and_roundtrips(tmp_path):
    texts = ["red running shoes with laces", "blue running shoes for trail running",
             "running shoes sale", "glass lab beaker 500 ml", "borosilicate glass beaker set",
             "glass beaker lab", ""]
    enc = LsaEncoder(dim=2).fit(texts)
    x = enc.encode(texts)
    assert x.shape == (7, 2) and x.dtype == np.float32
    assert x[0] @ x[1] > 0.9 and x[3] @ x[4] > 0.9 and abs(x[0] @ x[3]) < 0.1
    assert not x[6].any()  # empty text -> zero vector, not NaN
    enc.save(str(tmp_path))
    np.testing.assert_array_equal(load_encoder(str(tmp_path)).encode(texts), x)
    (tmp_path / "lsa.npz").write_bytes(b"broken")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_encoder(str(tmp_path))


def test_hf_encoder_local_model_dir(tmp_path):
    """The `hf` path with a tiny BERT built from a config (no download anywhere)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for v in CATEGORY_WORDS.values() for w in v.split()})
    (tmp_path / "vocab.txt").write_text("\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)
    ads = synthetic_ads(40)
    cfg = SidConfig(ingest_dir=make_ingest(tmp_path / "ingest", ads), out=str(tmp_path / "out"),
                    encoder="hf", model_path=str(tmp_path), quantizer="rqkmeans",
                    embed_on="local", levels=2, codebook_size=4)
    run(cfg)
    emb = read_table(cfg.out, "embeddings")
    x = np.stack(emb.column("embedding").to_numpy(zero_copy_only=False))
    assert x.shape == (40, 16)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert_unique_and_invertible(load_table(cfg.out))
    with pytest.raises(ArtifactError, match="local directory"):
        run(SidConfig(ingest_dir=cfg.ingest_dir, out=str(tmp_path / "o2"), encoder="hf",
                      model_path=str(tmp_path / "no-such-model"), embed_on="local"))


def test_report_numbers():
    codes = np.array([[0, 1], [0, 1], [1, 0], [2, 1]])
    lv = level_stats(codes, [4, 2])
    assert lv[0]["utilisation"] == 0.75 and lv[1]["utilisation"] == 1.0
    assert lv[1]["entropy_bits"] == 0.8113
    assert collision_stats(codes) == {"collision_rate": 0.5, "duplicate_rate": 0.25,
                                      "max_group": 2, "unique_prefixes": 3}
    r = same_category_rate(np.array([0, 0, 1, 1]), ["x", "x", "y", "x"])
    assert r["same_code_pairs"] == 0.5 and r["random_pairs"] == 0.5


def test_rqkmeans_fewer_points_than_codes():
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    q = RqKMeans(2, 16, kmeans_iters=5).fit(x)
    t = SidTable.from_codes([str(i) for i in range(5)], q.encode(x), q.codebook_sizes)
    assert_unique_and_invertible(t)
    trie = SidTrie.from_table(t)
    assert len(trie.next_tokens([])) == len(set(t.codes[:, 0]))


def test_a_catalog_without_content_events_has_empty_title_codes(synth_run):
    """A real dataset of ads only (Scientific) codes no titles; the prompts stage then finds
    an empty table of codes, not a missing one (which would mean bring-your-own S-IDs)."""
    from leadre.sids.content import ContentCodes

    _, cfg, manifest = synth_run
    assert manifest["quality"]["titles"]["titles"] == 0
    codes = ContentCodes.from_sids_dir(cfg.out, 2, list("abcde"))
    assert codes is not None and codes.codes == {} and codes.code("anything") is None
