"""Stage 7 (ScaNN index over active ads): only active ads, ScaNN's size rules, recall@10 vs
exact search, relocatable serialisation, active-flag refresh, CLI and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.compute as pc
import pytest

from leadre.artifacts import ArtifactError, read_manifest, read_table, write_table
from leadre.cli import main
from leadre.config import ConfigError
from leadre.index import AdIndex, IndexConfig, run
from leadre.sids.ann import build, choose_mode, exact_topk, load_embeddings, recall_at
from leadre.sids import load_table

from serving_world import make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("ixworld"), index=False)


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ix") / "index")
    manifest = run(IndexConfig(sids_dir=world["sids"], ingest_dir=world["ingest"], out=out))
    return out, manifest


def test_rules_of_thumb():
    assert choose_mode(19_999) == "brute_force"
    assert choose_mode(20_000) == choose_mode(99_999) == "ah"
    assert choose_mode(100_000) == "tree_ah"
    assert choose_mode(10, "tree_ah") == "tree_ah"


def test_index_holds_only_active_ads(world, built):
    out, manifest = built
    table = load_table(world["sids"])
    active = set(table.ad_id_array[table.active].tolist())
    ix = AdIndex.load(out)
    assert set(ix.ad_ids.tolist()) == active
    assert len(active) < len(table)  # the world does have inactive ads
    assert manifest["stage"] == "index" and manifest["summary"]["mode"] == "brute_force"
    assert manifest["summary"]["inactive_skipped"] == len(table) - len(active)
    ids, emb = load_embeddings(world["sids"])
    for q in emb[:50]:  # including queries that sit right on an inactive ad
        assert {a for a, _ in ix.search(q, 20)} <= active
    assert ix.sid_version == table.version
    assert set(ix.ad_ids[ix.popular].tolist()) <= active and len(ix.popular) > 0


def test_recall_vs_exact(world, built):
    out, manifest = built
    ix = AdIndex.load(out)
    assert manifest["summary"]["recall_at_10"] >= 0.9
    ids, emb = load_embeddings(world["sids"])
    db = emb[np.isin(ids, ix.ad_ids)]
    rows, _ = ix.search_rows(emb[:100], 10)
    truth = exact_topk(db, emb[:100] / np.linalg.norm(emb[:100], axis=1, keepdims=True), 10)
    # Same row order: ix.ad_ids follows the embeddings order filtered to active ads.
    assert recall_at(rows, truth) >= 0.9


def clustered(n: int, d: int = 32, centers: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d))
    x = c[rng.integers(0, centers, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("mode", ["ah", "tree_ah"])
def test_scann_modes_reach_recall_target(mode):
    db = clustered(25_000)
    q = clustered(300, seed=1)
    searcher, info = build(db, IndexConfig(mode=mode, min_recall=0.9), q)
    assert info["mode"] == mode and info["recall_at_10"] >= 0.9, info
    if mode == "tree_ah":
        assert info["build_params"]["num_leaves"] == round(25_000 ** 0.5)


def test_serialized_index_is_relocatable(built, tmp_path):
    out, _ = built
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    a, b = AdIndex.load(out), AdIndex.load(str(moved))
    ids, emb = load_embeddings(read_manifest(out)["inputs"]["sids_dir"])
    assert a.search(emb[3], 10) == b.search(emb[3], 10)
    assert a.version == b.version


def test_catalog_active_flags_refresh_without_new_sids(world, tmp_path):
    """Ads switched off in the catalog disappear from a rebuilt index (no S-ID rebuild)."""
    ads = read_table(world["ingest"], "ads")
    ix_before = AdIndex.load(run(IndexConfig(sids_dir=world["sids"], ingest_dir=world["ingest"],
                                             out=str(tmp_path / "a")))["summary"]["out"])
    off = ix_before.ad_ids[:25].tolist()
    ingest2 = tmp_path / "ingest2"
    shutil.copytree(world["ingest"], ingest2)
    flags = pc.invert(pc.is_in(ads.column("ad_id"), value_set=__import__("pyarrow").array(off)))
    ads2 = ads.set_column(ads.schema.get_field_index("active"), "active",
                          pc.and_(ads.column("active"), flags))
    write_table(ads2, str(ingest2), "ads")
    m = run(IndexConfig(sids_dir=world["sids"], ingest_dir=str(ingest2), out=str(tmp_path / "b")))
    ix_after = AdIndex.load(str(tmp_path / "b"))
    assert len(ix_after) == len(ix_before) - 25
    assert not set(off) & set(ix_after.ad_ids.tolist())
    assert ix_after.version != ix_before.version
    assert m["counts"]["ads"] == len(ix_after)


def test_cli_and_bad_input(world, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["index", "--sids-dir", world["sids"], "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "brute_force" and summary["recall_at_10"] >= 0.9
    assert main(["index", "--sids-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope does not exist (expected the output of stage 'sids')" in capsys.readouterr().err
    assert main(["index", "--sids-dir", world["ingest"], "--out", str(out)]) == 2  # wrong stage
    with pytest.raises(ConfigError, match="min_recall"):
        IndexConfig(min_recall=1.5)
    with pytest.raises(ConfigError, match="reorder"):
        IndexConfig(reorder=3)
    with pytest.raises(ArtifactError):
        AdIndex.load(world["sids"])


def test_build_writes_no_pickle_and_records_a_content_hash(built):
    out, manifest = built
    from pathlib import Path

    files = [p for p in Path(out).rglob("*") if p.is_file()]
    assert files and not [p for p in files if p.suffix in (".pkl", ".pickle")]
    content = read_manifest(out)["content"]
    assert len(content["sha256"]) == 64
    assert set(content["files"]) == {str(p.relative_to(out)) for p in files} - {"manifest.json"}


def test_recall_is_reported_on_held_out_user_history_queries(built):
    """Tuned on one set of users' history queries (built the way the matcher builds them),
    reported on another."""
    _, manifest = built
    info = manifest["index"]
    assert info["query_source"] == "user_histories"
    assert info["queries"]["tune"] > 0 and info["queries"]["held_out"] > 0
    assert info["recall_at_10"] >= 0.9 and "tune_recall_at_10" in info


def test_tuning_and_reported_recall_use_different_queries():
    db = clustered(25_000)
    q = clustered(400, seed=1)
    _, info = build(db, IndexConfig(mode="ah", min_recall=0.9), q)
    assert info["queries"] == {"tune": 200, "held_out": 200}
    assert info["recall_at_10"] >= 0.85 and info["tune_recall_at_10"] >= 0.9


def _copy(out, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(out, dst)
    return dst


def test_unsafe_index_directories_are_refused(built, tmp_path):
    """Each check on its own: outside the root, a pickle anywhere, changed or extra files,
    no recorded hash, a ScaNN asset path leaving the directory."""
    out, _ = built
    ok = _copy(out, tmp_path, "ok")
    assert len(AdIndex.load(str(ok), root=str(tmp_path))) > 0
    with pytest.raises(ArtifactError, match="outside the index root"):
        AdIndex.load(str(ok), root=str(tmp_path / "sub"))
    with pytest.raises(ArtifactError, match="outside the index root"):
        AdIndex.load(str(tmp_path / "sub" / ".." / ".." / tmp_path.name / "ok"),
                     root=str(tmp_path / "sub"))
    link = tmp_path / "sub"
    link.mkdir()
    (link / "alias").symlink_to(ok)  # a symlink inside the root to a directory outside it
    with pytest.raises(ArtifactError, match="outside the index root"):
        AdIndex.load(str(link / "alias"), root=str(link))

    pickled = _copy(out, tmp_path, "pickled")
    (pickled / "scann" / "scann_docids.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(ArtifactError, match="pickle"):
        AdIndex.load(str(pickled))
    hidden = _copy(out, tmp_path, "hidden")
    (hidden / "ads" / "x.PICKLE").write_bytes(b"\x80\x04N.")
    with pytest.raises(ArtifactError, match="pickle"):
        AdIndex.load(str(hidden))

    changed = _copy(out, tmp_path, "changed")
    npy = changed / "scann" / "dataset.npy"
    npy.write_bytes(npy.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ArtifactError, match="content hash mismatch.*dataset.npy"):
        AdIndex.load(str(changed))
    extra = _copy(out, tmp_path, "extra")
    (extra / "notes.txt").write_text("hi")
    with pytest.raises(ArtifactError, match="content hash mismatch.*notes.txt"):
        AdIndex.load(str(extra))

    unhashed = _copy(out, tmp_path, "unhashed")
    m = json.loads((unhashed / "manifest.json").read_text())
    m.pop("content")
    (unhashed / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="no content hash"):
        AdIndex.load(str(unhashed))

    escaping = _copy(out, tmp_path, "escaping")
    assets = escaping / "scann" / "scann_assets.pbtxt"
    assets.write_text(assets.read_text().replace('"dataset.npy"', '"../../ok/scann/dataset.npy"'))
    with pytest.raises(ArtifactError, match="outside the index directory"):
        AdIndex.load(str(escaping))
