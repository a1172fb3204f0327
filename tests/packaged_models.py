"""The real model packages for the tests, as `make install` installs them
(requirements-models.txt: pinned, hash-checked). A test that needs one skips only when it is
not installed at all; a wrong version or a damaged file fails it.

:func:`copy_install` lays out a copy of an installed package in another directory (its
dist-info and one of its files), for tests that damage the file or change the version and hand
the copy's directory to the stage's lookup as its search path."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
from pathlib import Path

import pytest

from leadre.packaged import INSTALL_COMMAND, REQUIREMENTS, PinnedPackage, installed_distribution

REPO = Path(__file__).resolve().parents[1]


def pinned_requirements() -> dict[str, tuple[str, list[str]]]:
    """``{package: (version, [sha256, ...])}`` of the repo's requirements-models.txt."""
    text = (REPO / REQUIREMENTS).read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
            assert m, f"{REQUIREMENTS}: not a pinned, hashed requirement: {line!r}"
            pins[m[1]] = (m[2], re.findall(r"sha256:([0-9a-f]{64})", m[3]))
    return pins


def require_installed(entry: PinnedPackage) -> importlib.metadata.Distribution:
    """``entry``'s installed distribution (of the pinned version), or skip the calling test
    when the package is not installed."""
    try:
        importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{entry.requirement} is not installed ({INSTALL_COMMAND}, which "
                    "`make install` runs, installs it)")
    return installed_distribution(entry)


def copy_install(entry: PinnedPackage, site: Path, member: str | None = None, *,
                 version: str | None = None) -> Path | None:
    """Copy ``entry``'s installed dist-info and its file ``member`` into the directory ``site``
    (the file as a real copy, safe to damage; ``version`` rewrites the copied metadata's
    version). Returns the copied ``member``, if any."""
    dist = require_installed(entry)
    for f in dist.files or ():
        if f.parts[0].endswith(".dist-info"):
            (site / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dist.locate_file(f), site / f)
            if version is not None and f.name == "METADATA":
                text = (site / f).read_text()
                (site / f).write_text(text.replace(f"\nVersion: {entry.version}\n",
                                                   f"\nVersion: {version}\n", 1))
    if member is None:
        return None
    target = site / member
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dist.locate_file(member), target)
    return target


def flip_byte(path: Path, offset: int = 1 << 20) -> None:
    """Change one byte of ``path`` in place (same size, another sha256)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
