"""Artifact directories: where each stage writes, the manifest it leaves, and how the next
stage finds its inputs. A location is a local path or any pyarrow filesystem URI (s3://,
gs://, hdfs://), so stages can run on different clusters.

Layout of a stage directory::

    <dir>/manifest.json        stage, created_at, inputs, config, versions, counts, timings
    <dir>/<table>/part-*.parquet
"""

from __future__ import annotations

import json
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """An input artifact is missing, corrupt or from an incompatible stage."""


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a filesystem URI."""
    location = str(location)
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def join(location: str | Path, *parts: str) -> str:
    return "/".join([str(location).rstrip("/"), *parts])


def makedirs(location: str | Path) -> None:
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)


def exists(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("leadre", "ray", "pyarrow", "numpy", "pandas", "torch", "transformers",
                "peft", "trl", "scann"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_manifest(location: str | Path, stage: str, *, inputs: dict[str, Any], config: Any,
                   counts: dict[str, Any], timings: dict[str, float],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    # A relative input directory is recorded absolute: later stages (and their Ray workers,
    # which do not run in this process's directory) find the input from the record.
    inputs = {k: str(Path(v).resolve()) if _is_relative_local(v) else v
              for k, v in inputs.items()}
    manifest = {
        "stage": stage,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "config": config,
        "versions": versions(),
        "counts": counts,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        **(extra or {}),
    }
    write_json(location, MANIFEST, manifest)
    return _jsonable(manifest)


def _is_relative_local(value: Any) -> bool:
    return (isinstance(value, str) and bool(value) and "://" not in value
            and not Path(value).is_absolute() and Path(value).exists())


def read_manifest(location: str | Path, stage: str | tuple[str, ...] | None = None
                  ) -> dict[str, Any]:
    """The manifest of a stage directory; ``stage`` (a name, or several accepted ones) checks
    it came from the expected stage. A directory without one is not a finished stage output:
    the manifest is written last."""
    wanted = (stage,) if isinstance(stage, str) else tuple(stage or ())
    expected = " or ".join(repr(s) for s in wanted)
    if not exists(join(location, MANIFEST)):
        what = f"the output of stage {expected}" if wanted else "a leadre stage output"
        if not exists(location):
            raise ArtifactError(f"{location} does not exist (expected {what})")
        raise ArtifactError(f"{location} has no {MANIFEST}: it is not {what}, or that run "
                            "did not finish")
    manifest = read_json(location, MANIFEST)
    if wanted and manifest.get("stage") not in wanted:
        raise ArtifactError(
            f"{location} holds the output of stage {manifest.get('stage')!r}, expected {expected}")
    return manifest


def check_sid_version(location: str | Path, manifest: dict[str, Any], sid_version: str | None,
                      source: str, encoder_version: str | None = None) -> None:
    """Refuse an artifact whose manifest records another S-ID version than ``sid_version``
    (the version ``source`` holds): the same S-ID names different ads in two versions, so
    mixing them recommends the wrong ads without any error. The text encoder is checked
    first (``encoder_version``, :func:`leadre.sids.encoder.encoder_version`), since codes and
    knowledge tokens of another encoder mean nothing to the model; the message names both.
    Unrecorded versions pass."""
    built_enc = manifest.get("encoder_version")
    if built_enc and encoder_version and built_enc != encoder_version:
        raise ArtifactError(f"{location} was built with text encoder {built_enc} but {source} "
                            f"holds the vectors and S-IDs of encoder {encoder_version}: rebuild "
                            "it from these S-IDs, or point it at the S-ID stage it came from")
    built = manifest.get("sid_version")
    if built and sid_version and built != sid_version:
        raise ArtifactError(f"{location} was built from S-ID version {built} but {source} "
                            f"holds version {sid_version}")


# Where a model directory keeps a loadable model (``leadre.model.factory.load_trained`` looks
# in this order; an ``sft`` / ``dpo`` output is loaded from ``merged/``).
MODEL_SUBDIRS = ("merged", "model", ".")


def check_model(model_dir: str | Path, sid_version: str | None,
                sids_dir: str | Path) -> None:
    """A model directory with a manifest must be a finished ``sft`` / ``dpo`` output (its
    ``merged/`` model written) trained on the S-ID version ``sid_version`` (of ``sids_dir``):
    its tokens would name other ads otherwise. A plain Hugging Face model directory has no
    manifest and nothing recorded to check, but must exist and hold a model: else this raises
    the ``FileNotFoundError`` that loading it would (``load_trained``), before any loading."""
    if exists(join(model_dir, MANIFEST)):
        manifest = read_manifest(model_dir, stage=("sft", "dpo"))
        check_sid_version(f"the model in {model_dir}", manifest, sid_version, str(sids_dir),
                          read_manifest(sids_dir).get("encoder_version"))
        if not exists(join(model_dir, MODEL_SUBDIRS[0], "config.json")):
            raise ArtifactError(f"{join(model_dir, MODEL_SUBDIRS[0])} holds no model: did the "
                                f"{manifest.get('stage')} run finish?")
        return
    if not exists(model_dir):
        raise FileNotFoundError(f"{model_dir} does not exist (expected the output of stage "
                                "'sft' or 'dpo', or a Hugging Face model directory)")
    if not any(exists(join(model_dir, sub, "config.json")) for sub in MODEL_SUBDIRS):
        raise FileNotFoundError(f"{model_dir} holds no model: neither the output of stage 'sft' "
                                f"or 'dpo' (no {MANIFEST}) nor a Hugging Face model directory "
                                "(no config.json in merged/, model/ or the directory itself)")


def write_text(location: str | Path, name: str, data: str | bytes) -> str:
    """Write one file ``<location>/<name>`` (text is UTF-8), creating the directory."""
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return join(location, name)


def read_bytes(location: str | Path, name: str) -> bytes:
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(f"{path}/{name}") as f:
            return f.read()
    except FileNotFoundError:
        raise ArtifactError(f"{join(location, name)} does not exist") from None


def write_json(location: str | Path, name: str, obj: Any) -> str:
    return write_text(location, name, json.dumps(_jsonable(obj), indent=2))


def read_json(location: str | Path, name: str) -> Any:
    try:
        return json.loads(read_bytes(location, name))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{join(location, name)} is corrupt: {e}") from None


def write_table(table: pa.Table, location: str | Path, name: str,
                rows_per_file: int = 1_000_000) -> str:
    """Write ``table`` as parquet shards under ``<location>/<name>/`` (replacing old shards)."""
    fs, path = resolve(join(location, name))
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    fs.create_dir(path, recursive=True)
    pads.write_dataset(table, path, filesystem=fs, format="parquet",
                       basename_template="part-{i}.parquet",
                       max_rows_per_file=max(rows_per_file, 1),
                       max_rows_per_group=min(max(rows_per_file, 1), 128 * 1024),
                       existing_data_behavior="overwrite_or_ignore")
    return join(location, name)


def read_table(location: str | Path, name: str | None = None,
               schema: pa.Schema | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read all parquet shards of ``<location>/<name>`` into one table (only ``columns``
    where given)."""
    target = join(location, name) if name else str(location)
    fs, path = resolve(target)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise ArtifactError(f"{target} does not exist")
    try:
        return pq.read_table(path, filesystem=fs, schema=schema, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise ArtifactError(f"cannot read parquet at {target}: {e}") from None


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
