"""Every stage refuses an input directory that is not what it expects, through the CLI, before
doing any work: another stage's output (the message names both stages), a directory without a
manifest (not a finished stage output), or artifacts of another S-ID version (the message
names both versions). ``leadre.cli.main`` returns 2 with a one-line error for each.

Stages that read upstream directories: sids, prompts, sft, dpo, eval, index, and warm and serve,
whose inputs are loaded inside Ray actors / Serve replicas: they are checked on the driver first
(a wrong directory would otherwise fail in a replica that Serve restarts over and over)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_data import SID_VERSION, write_prompts  # noqa: E402

from leadre.artifacts import write_manifest  # noqa: E402
from leadre.cli import main  # noqa: E402
from leadre.sids.table import SidTable  # noqa: E402

OTHER_VERSION = "othersids0002"


def _sft_dir(path: Path, sids_dir: Path, sid_version: str) -> Path:
    """What `leadre dpo` / `leadre eval` check of a finished SFT run (model dirs, manifest)."""
    for sub in ("model", "merged"):
        (path / sub).mkdir(parents=True)
        (path / sub / "config.json").write_text("{}")
    write_manifest(path, "sft", inputs={"sids_dir": str(sids_dir)}, config={}, counts={},
                   timings={}, extra={"sid_version": sid_version})
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("artifacts")
    world = write_prompts(root / "world", n_users=20)
    other = root / "other_sids"  # the same ads under another S-ID version
    SidTable.from_codes([f"ad{i}" for i in range(4)], np.array([[0, 0], [0, 1], [1, 0], [1, 1]]),
                        [2, 2], version=OTHER_VERSION).save(str(other))
    write_manifest(other, "sids", inputs={}, config={}, counts={}, timings={},
                   extra={"sid_version": OTHER_VERSION})
    ingest = root / "ingest"
    write_manifest(ingest, "ingest", inputs={}, config={}, counts={}, timings={})
    (root / "empty").mkdir()
    for name, version in (("index", SID_VERSION), ("index_other", OTHER_VERSION)):
        write_manifest(root / name, "index", inputs={}, config={}, counts={}, timings={},
                       extra={"sid_version": version})
    return {"index": str(root / "index"), "index_other": str(root / "index_other"),
            "sids": str(world["sids"]), "prompts": str(world["prompts"]), "ingest": str(ingest),
            "other_sids": str(other), "empty": str(root / "empty"),
            "sft": str(_sft_dir(root / "sft", world["sids"], SID_VERSION)),
            "sft_other": str(_sft_dir(root / "sft_other", other, OTHER_VERSION)),
            "out": str(root / "out")}


def _wrong(expected: str, given: str) -> tuple[str, list[str]]:
    return given, [f"holds the output of stage {given!r}", repr(expected)]


def _missing(expected: str) -> tuple[str, list[str]]:
    return "empty", ["has no manifest.json", f"the output of stage {expected!r}"]


VERSIONS = [SID_VERSION, OTHER_VERSION]
# (stage, {option: directory key} of valid inputs, the option under test, (its directory key,
# what the error must name)).
CASES = [
    ("sids", {}, "ingest_dir", _wrong("ingest", "prompts")),
    ("sids", {}, "ingest_dir", _missing("ingest")),
    ("prompts", {"sids_dir": "sids"}, "ingest_dir", _wrong("ingest", "sids")),
    ("prompts", {"sids_dir": "sids"}, "ingest_dir", _missing("ingest")),
    ("prompts", {"ingest_dir": "ingest"}, "sids_dir", _wrong("sids", "prompts")),
    ("prompts", {"ingest_dir": "ingest"}, "sids_dir", _missing("sids")),
    ("sft", {}, "prompts_dir", _wrong("prompts", "ingest")),
    ("sft", {}, "prompts_dir", _missing("prompts")),
    ("sft", {"prompts_dir": "prompts"}, "sids_dir", _wrong("sids", "prompts")),
    ("sft", {"prompts_dir": "prompts"}, "sids_dir", _missing("sids")),
    ("sft", {"prompts_dir": "prompts"}, "sids_dir", ("other_sids", VERSIONS)),
    ("dpo", {"prompts_dir": "prompts"}, "sft_dir", _wrong("sft", "prompts")),
    ("dpo", {"prompts_dir": "prompts"}, "sft_dir", _missing("sft")),
    ("dpo", {"prompts_dir": "prompts"}, "sft_dir", ("sft_other", VERSIONS)),
    ("dpo", {"sft_dir": "sft"}, "prompts_dir", _wrong("prompts", "sids")),
    ("dpo", {"sft_dir": "sft"}, "prompts_dir", _missing("prompts")),
    ("eval", {"model_dir": "sft"}, "prompts_dir", _wrong("prompts", "sft")),
    ("eval", {"model_dir": "sft"}, "prompts_dir", _missing("prompts")),
    ("eval", {"prompts_dir": "prompts"}, "sids_dir", _wrong("sids", "ingest")),
    ("eval", {"prompts_dir": "prompts"}, "sids_dir", _missing("sids")),
    ("eval", {"prompts_dir": "prompts"}, "sids_dir", ("other_sids", VERSIONS)),
    ("eval", {"prompts_dir": "prompts", "sids_dir": "sids"}, "model_dir",
     ("ingest", ["holds the output of stage 'ingest'", "'sft' or 'dpo'"])),
    ("eval", {"prompts_dir": "prompts", "sids_dir": "sids"}, "model_dir",
     ("sft_other", VERSIONS)),
    ("eval", {"prompts_dir": "prompts", "sids_dir": "sids", "model_dir": "sft"}, "ingest_dir",
     _wrong("ingest", "sids")),
    ("eval", {"prompts_dir": "prompts", "sids_dir": "sids", "model_dir": "sft"}, "ingest_dir",
     _missing("ingest")),
    ("index", {}, "sids_dir", _wrong("sids", "prompts")),
    ("index", {}, "sids_dir", _missing("sids")),
    ("index", {"sids_dir": "sids"}, "ingest_dir", _wrong("ingest", "sids")),
    ("index", {"sids_dir": "sids"}, "ingest_dir", _missing("ingest")),
] + [  # warm and serve: every input before Ray starts (warm also reads an ingest directory)
    (stage, {k: v for k, v in valid.items() if k != option}, option, bad)
    for stage, valid in (
        ("warm", {"ingest_dir": "ingest", "sids_dir": "sids", "index_dir": "index"}),
        ("serve", {"sids_dir": "sids", "index_dir": "index"}))
    for option, bad in (
        *([("ingest_dir", _wrong("ingest", "prompts")), ("ingest_dir", _missing("ingest"))]
          if stage == "warm" else []),
        ("sids_dir", _wrong("sids", "ingest")), ("sids_dir", _missing("sids")),
        ("index_dir", _wrong("index", "sids")), ("index_dir", _missing("index")),
        ("index_dir", ("index_other", VERSIONS)),
        ("model_dir", ("prompts", ["holds the output of stage 'prompts'", "'sft' or 'dpo'"])),
        ("model_dir", ("sft_other", VERSIONS)))
]


def _id(case) -> str:
    stage, _, option, (given, _) = case
    return f"{stage}-{option}-{given}"


@pytest.mark.parametrize("stage,valid,option,bad", CASES, ids=[_id(c) for c in CASES])
def test_stage_refuses_a_wrong_input_directory(ray_local, dirs, capsys, stage, valid, option, bad):
    given, names = bad
    args = [stage] + (["--out", dirs["out"]] if stage not in ("warm", "serve") else [])
    for opt, key in {**valid, option: given}.items():
        args += [f"--{opt.replace('_', '-')}", dirs[key]]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    print(f"\nleadre {' '.join(a for a in args if a not in ('--out', dirs['out']))}\n"
          f"  -> {err}")
    assert err.startswith(f"leadre {stage}: error: ") and "\n" not in err
    for name in names:
        assert name in err
