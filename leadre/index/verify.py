"""What an index directory must pass before anything in it is loaded.

ScaNN's own loader unpickles ``scann_docids.pkl`` when that file exists, and the matcher
loads whatever directory the admin endpoint or the store names: without checks, anyone who
can write the store or holds the admin token could make every matcher replica run code. So:

* the directory must lie under a configured root (:func:`check_under_root`);
* it must hold no pickle at all (:data:`PICKLE_SUFFIXES`; the index stage never writes one,
  doc ids live in the ``ads`` parquet table), and ScaNN's asset paths must stay inside it;
* its files must match the content hash the index stage wrote into the manifest
  (:func:`content_digest`), so a directory changed, truncated or mixed after the build is
  refused instead of half-loaded.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from pathlib import Path

import pyarrow.fs as pafs

from leadre.artifacts import MANIFEST, ArtifactError, read_manifest, resolve

PICKLE_SUFFIXES = (".pkl", ".pickle")
_ASSET_PATH = re.compile(r'asset_path:\s*"([^"]*)"')


def _files(location: str) -> dict[str, int]:
    """Relative path -> size of every file under ``location`` (recursively)."""
    fs, root = resolve(location)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise ArtifactError(f"{location} is not a directory")
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File:
            out[posixpath.relpath(info.path, root)] = info.size
    return out


def content_digest(location: str) -> dict:
    """``{"sha256": ..., "files": {relative path: sha256}}`` over every file of the
    directory except the manifest (which records it)."""
    fs, root = resolve(location)
    files = {}
    for rel in sorted(_files(location)):
        if rel == MANIFEST:
            continue
        h = hashlib.sha256()
        with fs.open_input_stream(f"{root}/{rel}") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        files[rel] = h.hexdigest()
    total = hashlib.sha256("".join(f"{p}\0{d}\n" for p, d in files.items()).encode())
    return {"sha256": total.hexdigest(), "files": files}


def refuse_pickles(location: str) -> None:
    found = sorted(p for p in _files(location) if p.lower().endswith(PICKLE_SUFFIXES))
    if found:
        raise ArtifactError(f"{location} holds a pickle ({', '.join(found[:3])}): refused, "
                            "an index directory must not contain code to unpickle")


def check_assets(location: str, scann_dir: str) -> None:
    """ScaNN's ``scann_assets.pbtxt`` names the files it loads: all must be relative and
    inside the directory (``serialize(relative_path=True)`` writes them so)."""
    fs, root = resolve(location)
    with fs.open_input_stream(f"{root}/{scann_dir}/scann_assets.pbtxt") as f:
        text = f.read().decode("utf-8", errors="replace")
    for path in _ASSET_PATH.findall(text):
        norm = posixpath.normpath(path)
        if path.startswith("/") or norm.startswith("..") or "://" in path:
            raise ArtifactError(f"{location}: ScaNN asset path {path!r} points outside the "
                                "index directory: refused")


def verify_index_dir(location: str, stage: str, scann_dir: str) -> dict:
    """Every check on an index directory; returns its manifest."""
    manifest = read_manifest(location, stage=stage)
    refuse_pickles(location)
    check_assets(location, scann_dir)
    recorded = (manifest.get("content") or {}).get("sha256")
    if not recorded:
        raise ArtifactError(f"{location}: the manifest records no content hash (built by an "
                            "older `leadre index`?): rebuild the index")
    actual = content_digest(location)
    if actual["sha256"] != recorded:
        want = manifest["content"].get("files", {})
        changed = sorted(set(want) ^ set(actual["files"]) |
                         {p for p in want if actual["files"].get(p) != want[p]})
        raise ArtifactError(f"{location}: content hash mismatch (changed, missing or extra: "
                            f"{', '.join(changed[:5]) or '?'}): refused")
    return manifest


def check_under_root(location: str, root: str | None) -> None:
    """Refuse ``location`` unless it lies under ``root`` (symlinks resolved for local
    paths; URIs compare scheme, bucket and path). ``root=None`` allows any location."""
    if root is None:
        return
    if ("://" in location) != ("://" in root):
        raise ArtifactError(f"index directory {location} is outside the index root {root}")
    if "://" in location:
        scheme, _, rest = location.partition("://")
        rscheme, _, rrest = root.partition("://")
        norm, rnorm = posixpath.normpath(rest), posixpath.normpath(rrest)
        inside = scheme == rscheme and (norm == rnorm or norm.startswith(rnorm.rstrip("/") + "/"))
    else:
        path, base = Path(location).expanduser().resolve(), Path(root).expanduser().resolve()
        inside = path == base or path.is_relative_to(base)
    if not inside:
        raise ArtifactError(f"index directory {location} is outside the index root {root}: "
                            "refused")
