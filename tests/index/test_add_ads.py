"""`leadre add-ads` on a real small world (LSA encoder, RQ-KMeans S-IDs, real ScaNN), no Ray:
new ads get the S-IDs the trained quantiser gives their text (same S-ID version, old S-IDs
untouched), the fixed disambiguation level is respected when a group is full, the embeddings
and a new index version hold them, models trained before still load, the LLM decoder's trie
reaches them; and every kind of unusable ad is refused with nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from leadre.artifacts import ArtifactError, check_model, read_manifest, read_table, write_manifest
from leadre.index import AdIndex
from leadre.index.add_ads import add_ads, read_new_ads
from leadre.sids import load_table
from leadre.sids.ann import load_embeddings
from leadre.sids.encoder import ad_text, load_encoder
from leadre.sids.extend import AdsRefused, assign_sids
from leadre.sids.quantize import load_quantizer
from leadre.sids.table import SidTable

from serving_world import make_world


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("add_ads"), ads=300, users=60)


@pytest.fixture
def world(base, tmp_path):
    """A private copy of the S-IDs and the index (tests extend them); the ingest is shared."""
    out = dict(base)
    for name in ("sids", "index"):
        shutil.copytree(base[name], tmp_path / name)
        out[name] = str(tmp_path / name)
    return out


def catalog_ads(world) -> list[dict]:
    return read_table(world["ingest"], "ads").to_pylist()


def quantiser_codes(sids_dir: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """What the S-ID stage's encoder and quantiser give these texts (codes, ranked last)."""
    emb = load_encoder(f"{sids_dir}/encoder").encode(texts)
    return load_quantizer(sids_dir, device="cpu").rank_last_level(emb)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (the lock file aside) -> its sha256."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".catalog.lock"}


def test_new_ads_get_the_quantisers_sids_and_a_new_index_version(world):
    old = load_table(world["sids"])
    old_index = AdIndex.load(world["index"])
    ads = catalog_ads(world)
    twin_of = ads[0]  # same text as an ad the stage coded: the same quantiser codes
    mixed = f"{ads[3]['title']} {ads[8]['title']}"
    new = [{"ad_id": "new-twin", "title": twin_of["title"], "category": twin_of["category"],
            "description": twin_of["description"], "ecpm": 3.0},
           {"ad_id": "new-mixed", "title": mixed, "category": ads[3]["category"]},
           {"ad_id": "new-paused", "title": ads[9]["title"], "category": ads[9]["category"],
            "active": False}]
    out = add_ads(world["sids"], world["index"], new)

    table = load_table(world["sids"])
    # A pure append under the same S-ID version: every old ad keeps its S-ID.
    assert table.version == old.version and out["sid_version"] == old.version
    assert len(table) == len(old) + 3 and table.codebook_sizes == old.codebook_sizes
    assert table.ad_id_array[:len(old)].tolist() == old.ad_id_array.tolist()
    assert np.array_equal(table.codes[:len(old)], old.codes)
    assert np.array_equal(table.active[:len(old)], old.active)
    assert [a["ad_id"] for a in out["added"]] == ["new-twin", "new-mixed", "new-paused"]
    assert [a["sid"] for a in out["added"]] == table.sids(["new-twin", "new-mixed", "new-paused"])

    # The S-ID is what the trained quantiser gives the text: the twin shares the codes the
    # stage gave its original (all quantised levels when that group had room).
    levels = len(old.codebook_sizes) - 1
    codes, ranked = quantiser_codes(world["sids"], [ad_text(n["title"], n["category"],
                                                            n.get("description")) for n in new])
    orig = old.codes[old.rows_of([twin_of["ad_id"]])[0]]
    assert np.array_equal(codes[0], orig[:levels])
    width = old.codebook_sizes[-1]
    for i, ad_id in enumerate(["new-twin", "new-mixed", "new-paused"]):
        got = table.codes[table.rows_of([ad_id])[0]]
        assert np.array_equal(got[:levels - 1], codes[i, :levels - 1])  # same first levels
        assert got[levels - 1] in ranked[i]  # the quantiser's code or the next nearest free
        assert 0 <= got[-1] < width  # a disambiguation token the model knows
    group = (old.codes[:, :levels] == orig[:levels]).all(1).sum()
    twin = table.codes[table.rows_of(["new-twin"])[0]]
    if group < width:
        assert np.array_equal(twin[:levels], orig[:levels]) and twin[-1] == group
    assert not table.active[table.rows_of(["new-paused"])[0]]

    # The manifest records the extension; models trained before still load.
    m = read_manifest(world["sids"])
    assert m["version"] == old.version and m["counts"]["ads"] == len(table)
    ext = m["extensions"][-1]
    assert sorted(ext["added"]) == sorted(["new-twin", "new-mixed", "new-paused"])
    assert (ext["ads_before"], ext["ads_after"]) == (len(old), len(table))
    assert m["catalog"] == {"ads": len(table), "base_ads": len(old), "extensions": 1,
                            "id": out["catalog"]}
    model = Path(world["sids"]).parent / "sft"
    (model / "merged").mkdir(parents=True)
    (model / "merged" / "config.json").write_text("{}")
    write_manifest(str(model), "sft", inputs={}, config={}, counts={}, timings={},
                   extra={"sid_version": old.version, "encoder_version": m["encoder_version"]})
    check_model(str(model), table.version, world["sids"])

    # Embeddings: the new rows are the encoder's vectors.
    ids, emb = load_embeddings(world["sids"])
    assert len(ids) == len(table) and ids[-3:].tolist() == ["new-twin", "new-mixed", "new-paused"]
    enc = load_encoder(f"{world['sids']}/encoder")
    np.testing.assert_allclose(emb[-2], enc.encode([ad_text(mixed, ads[3]["category"], None)])[0],
                               atol=1e-6)
    added = read_table(world["sids"], "added_ads").to_pylist()
    assert [a["ad_id"] for a in added] == ["new-twin", "new-mixed", "new-paused"]
    assert added[0]["ecpm"] == 3.0 and added[0]["sid"] == table.sid("new-twin")

    # A new index version beside the old one, with the active new ads (not the paused one).
    assert out["index_dir"] == world["index"] + ".ads1"
    ix = AdIndex.load(out["index_dir"])
    assert ix.version != old_index.version and ix.sid_version == old.version
    assert {"new-twin", "new-mixed"} <= ix.active and "new-paused" not in ix.active
    assert len(ix) == len(old_index) + 2 and ix.info["sid_catalog"] == len(table)
    assert ix.search(emb[-2], 1)[0][0] == "new-mixed"
    assert AdIndex.load(world["index"]).version == old_index.version  # the old one untouched
    assert float(ix.ecpm[ix.ad_ids.tolist().index("new-twin")]) == 3.0

    # A second extension: the next index version, the catalog count goes on.
    out2 = add_ads(world["sids"], out["index_dir"], [{"ad_id": "new-4", "title": ads[20]["title"],
                                                       "category": ads[20]["category"]}])
    assert out2["index_dir"] == world["index"] + ".ads2" and out2["ads"] == len(table) + 1
    assert read_manifest(world["sids"])["catalog"]["extensions"] == 2
    assert np.array_equal(load_table(world["sids"]).codes[:len(table)], table.codes)


def test_a_full_group_takes_the_next_nearest_last_level_code(world):
    """More twins of one ad than the disambiguation level has tokens: the ones that do not
    fit take the next-nearest code of the last quantised level, never a new token."""
    old = load_table(world["sids"])
    width = old.codebook_sizes[-1]
    src = catalog_ads(world)[0]
    twins = [{"ad_id": f"twin-{i:02d}", "title": src["title"], "category": src["category"],
              "description": src["description"]} for i in range(width + 1)]
    out = add_ads(world["sids"], world["index"], twins)
    table = load_table(world["sids"])
    assert table.codebook_sizes == old.codebook_sizes  # no disambiguation token added
    levels = len(old.codebook_sizes) - 1
    codes, ranked = quantiser_codes(world["sids"], [ad_text(src["title"], src["category"],
                                                            src["description"])])
    got = table.codes[table.rows_of([t["ad_id"] for t in twins])]
    assert (got[:, :levels - 1] == codes[0, :levels - 1]).all()
    moved = got[:, levels - 1] != codes[0, -1]
    assert moved.any()  # the group (original + width twins) cannot hold them all
    # Nearest first: a twin moves to code r only when every code ranked before it is full.
    for row in got[moved]:
        rank = list(ranked[0]).index(row[levels - 1])
        for better in ranked[0][:rank]:
            key = np.array([*codes[0, :levels - 1], better])
            assert (table.codes[:, :levels] == key).all(1).sum() == width
    assert len(set(map(tuple, table.codes.tolist()))) == len(table)
    assert read_manifest(world["sids"])["extensions"][-1]["moved_to_next_code"] == moved.sum()
    assert len(out["added"]) == width + 1


def test_assign_sids_policy_on_a_hand_made_table():
    # Two levels of 2 codes, no collisions at build time: one disambiguation token (e=0).
    table = SidTable.from_codes(["a", "b", "c"], np.array([[0, 0], [0, 1], [1, 1]]), [2, 2])
    assert table.codebook_sizes == [2, 2, 1]
    codes = np.array([[0, 0], [1, 1], [1, 0]])
    ranked = np.array([[0, 1], [1, 0], [0, 1]])
    full, problems = assign_sids(table, ["x", "y", "z"], codes, ranked)
    # x: prefix <a_0> has both last-level codes taken -> refused; y: (1,1) taken -> (1,0);
    # z (placed after y, ad_id order): (1,0) now taken by y -> (1,1) is taken too -> refused.
    assert full[1].tolist() == [1, 0, 0]
    assert [p[0] for p in problems] == ["'x'", "'z'"]
    assert "no free S-ID under <a_0>" in problems[0][1] and "rebuild the S-IDs" in problems[0][1]


BAD = [
    ({"ad_id": "n1", "category": "c"}, "n1", "title is required"),
    ({"ad_id": "n1", "title": "   ", "category": "c"}, "n1", "title is required"),
    ({"ad_id": "n1", "title": "x" * 1001, "category": "c"}, "n1", "title has 1,001 characters"),
    ({"ad_id": "bad id!", "title": "t", "category": "c"}, "bad id!", "bad_id"),
    ({"title": "no id", "category": "c"}, "in row 1", "ad_id is required"),
    ({"ad_id": "n1", "title": "t", "category": "c", "ecpm": -1}, "n1", "ecpm must be"),
    ({"ad_id": "n1", "title": "bad \ufffd bytes", "category": "c"}, "n1", "not valid text"),
    # (the LSA encoder knows only the catalog's words)
    ({"ad_id": "n1", "title": "t", "category": "c"}, "n1", "the text encoder finds nothing"),
]


@pytest.mark.parametrize("bad,who,why", BAD, ids=["no-title", "blank-title", "too-long",
                                                   "bad-id", "no-id", "negative-ecpm",
                                                   "undecodable", "no-known-word"])
def test_an_unusable_ad_is_refused_and_nothing_is_written(world, bad, who, why):
    sids, index = Path(world["sids"]), Path(world["index"])
    before = snapshot(sids), snapshot(index)
    good = {"ad_id": "fine-ad", "title": catalog_ads(world)[1]["title"], "category": "c"}
    with pytest.raises(AdsRefused) as e:
        add_ads(world["sids"], world["index"], [good, bad])
    msg = str(e.value)
    assert "nothing was added" in msg and why in msg, msg
    assert f"ad {who!r}" in msg or f"ad {who}" in msg, msg
    assert "fine-ad" not in msg
    assert (snapshot(sids), snapshot(index)) == before
    assert not Path(world["index"] + ".ads1").exists()


def test_duplicates_are_refused_by_name(world):
    ads = catalog_ads(world)
    before = snapshot(Path(world["sids"]))
    with pytest.raises(AdsRefused) as e:
        add_ads(world["sids"], world["index"], [
            {"ad_id": ads[0]["ad_id"], "title": "t", "category": "c"},
            {"ad_id": "n2", "title": "t", "category": "c"},
            {"ad_id": "n2", "title": "t", "category": "c"}])
    msg = str(e.value)
    assert f"ad {ads[0]['ad_id']!r}: already in the catalog with S-ID <a_" in msg
    assert "ad 'n2': given twice (rows 1 and 2)" in msg
    assert e.value.problems[0][0] == repr(ads[0]["ad_id"]) and len(e.value.problems) == 2
    assert snapshot(Path(world["sids"])) == before
    with pytest.raises(AdsRefused, match="holds no ads"):
        add_ads(world["sids"], world["index"], [])


def test_a_failed_index_build_puts_the_catalog_back(world, monkeypatch):
    import leadre.index.build as build

    def broken(cfg):
        Path(cfg.out).mkdir()
        (Path(cfg.out) / "half").write_text("x")
        raise OSError("disk full")

    before = snapshot(Path(world["sids"]))
    monkeypatch.setattr(build, "run", broken)
    with pytest.raises(OSError, match="disk full"):
        add_ads(world["sids"], world["index"], [{"ad_id": "n1", "category": "c",
                                                  "title": catalog_ads(world)[4]["title"]}])
    assert snapshot(Path(world["sids"])) == before
    assert not Path(world["index"] + ".ads1").exists()


def test_command_line(world, tmp_path, capsys):
    from leadre.cli import main

    src = catalog_ads(world)[2]
    path = tmp_path / "new_ads.jsonl"
    path.write_text(json.dumps({"ad_id": "cli-1", "title": src["title"],
                                "category": src["category"]}) + "\n")
    out = str(tmp_path / "index.v2")
    argv = ["add-ads", "--sids-dir", world["sids"], "--index-dir", world["index"],
            "--ads", str(path), "--out", out]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["index_dir"] == out and summary["added"][0]["ad_id"] == "cli-1"
    assert "cli-1" in AdIndex.load(out).active
    # Again: the ad is in the catalog now, so the command refuses it by name (exit 2).
    assert main([*argv[:-1], str(tmp_path / "index.v3")]) == 2
    err = capsys.readouterr().err
    assert "ad 'cli-1': already in the catalog" in err
    import csv

    more = tmp_path / "more.csv"
    with open(more, "w", newline="") as f:
        csv.writer(f).writerows([["ad_id", "title", "category", "ecpm"],
                                 ["cli-2", src["title"], src["category"], "1.5"]])
    assert main([*argv[:5], "--ads", str(more), "--out", str(tmp_path / "index.v4")]) == 0
    assert json.loads(capsys.readouterr().out)["added"][0]["ad_id"] == "cli-2"
    odd = tmp_path / "ads.xml"
    odd.write_text("<ads/>")
    with pytest.raises(ArtifactError, match="must be .jsonl, .json, .parquet or .csv"):
        read_new_ads(str(odd))
