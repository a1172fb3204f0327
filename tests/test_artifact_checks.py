"""Every stage refuses an input directory that is not what it expects, through the CLI, before
doing any work: another stage's output (the message names both stages), a directory without a
manifest (not a finished stage output), or artifacts of another S-ID version (the message
names both versions). ``leadre.cli.main`` returns 2 with a one-line error for each.

Stages that read upstream directories: sids, prompts, sft, dpo, eval, index, and warm and serve,
whose inputs are loaded inside Ray actors / Serve replicas: they are checked on the driver first
(a wrong directory would otherwise fail in a replica that Serve restarts over and over).
``test_index_warm_serve_fail_fast_without_starting_ray`` runs those three in a fresh process
whose ``ray.init`` refuses to run: a wrong input must be refused there, with exit 2, before any
Ray cluster, actor, task or Serve replica could exist."""

from __future__ import annotations

import json
import os
import subprocess
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
    # a finished-looking sft manifest whose merged model was never written
    write_manifest(root / "sft_unfinished", "sft", inputs={}, config={}, counts={}, timings={},
                   extra={"sid_version": SID_VERSION})
    for name, version in (("index", SID_VERSION), ("index_other", OTHER_VERSION)):
        write_manifest(root / name, "index", inputs={}, config={}, counts={}, timings={},
                       extra={"sid_version": version})
    return {"index": str(root / "index"), "index_other": str(root / "index_other"),
            "sids": str(world["sids"]), "prompts": str(world["prompts"]), "ingest": str(ingest),
            "other_sids": str(other), "empty": str(root / "empty"),
            "sft": str(_sft_dir(root / "sft", world["sids"], SID_VERSION)),
            "sft_other": str(_sft_dir(root / "sft_other", other, OTHER_VERSION)),
            "sft_unfinished": str(root / "sft_unfinished"), "missing": str(root / "missing"),
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


# --- fail fast: index, warm and serve refuse a wrong input before Ray exists ----------------

# Runs in a fresh interpreter: ``ray.init`` raises (and is counted) instead of starting a
# cluster, so a check that comes after it shows up as a RuntimeError, not as a slow pass.
_PROBE = r"""
import contextlib, io, json, logging, sys, time

logging.basicConfig(stream=sys.__stderr__, level=logging.WARNING)
import ray

calls = []


def refuse(*args, **kwargs):
    calls.append(1)
    raise RuntimeError("ray.init was called")


ray.init = refuse
from leadre.cli import main

results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(args)
        except BaseException as e:  # noqa: BLE001 - recorded and judged by the test
            rc = f"{type(e).__name__}: {e}"
    results.append({"rc": rc, "err": err.getvalue().strip(),
                    "s": round(time.perf_counter() - t0, 2), "ray_init_calls": len(calls),
                    "ray_initialized": ray.is_initialized()})
print(json.dumps(results))
"""

_WARM = {"ingest_dir": "ingest", "sids_dir": "sids", "index_dir": "index"}
_SERVE = {"sids_dir": "sids", "index_dir": "index"}
_DOES_NOT_EXIST = ["missing does not exist"]
# (stage, {option: directory key}, what the one-line error must name)
FAIL_FAST = [
    ("index", {"sids_dir": "missing"}, _DOES_NOT_EXIST + ["the output of stage 'sids'"]),
    ("index", {"sids_dir": "ingest"}, ["holds the output of stage 'ingest'", "'sids'"]),
    ("index", {"sids_dir": "sids", "ingest_dir": "missing"},
     _DOES_NOT_EXIST + ["the output of stage 'ingest'"]),
    ("index", {"sids_dir": "sids", "ingest_dir": "prompts"},
     ["holds the output of stage 'prompts'", "'ingest'"]),
    ("warm", {**_WARM, "ingest_dir": "missing"}, _DOES_NOT_EXIST + ["stage 'ingest'"]),
    ("warm", {**_WARM, "ingest_dir": "sids"}, ["holds the output of stage 'sids'", "'ingest'"]),
    ("warm", {**_WARM, "sids_dir": "missing"}, _DOES_NOT_EXIST + ["stage 'sids'"]),
    ("warm", {**_WARM, "index_dir": "sids"}, ["holds the output of stage 'sids'", "'index'"]),
    ("warm", {**_WARM, "index_dir": "index_other"}, VERSIONS),
    ("warm", {**_WARM, "model_dir": "sft_other"}, VERSIONS),
    ("warm", {**_WARM, "model_dir": "missing"}, _DOES_NOT_EXIST),
    ("warm", {**_WARM, "model_dir": "sft_unfinished"}, ["merged holds no model"]),
    ("serve", {**_SERVE, "sids_dir": "missing"}, _DOES_NOT_EXIST + ["stage 'sids'"]),
    ("serve", {**_SERVE, "sids_dir": "index"}, ["holds the output of stage 'index'", "'sids'"]),
    ("serve", {**_SERVE, "index_dir": "missing"}, _DOES_NOT_EXIST + ["stage 'index'"]),
    ("serve", {**_SERVE, "index_dir": "ingest"}, ["holds the output of stage 'ingest'",
                                                  "'index'"]),
    ("serve", {**_SERVE, "index_dir": "index_other"}, VERSIONS),
    ("serve", {**_SERVE, "index_root": "empty"}, ["outside the index root"]),
    ("serve", {**_SERVE, "model_dir": "sft_other"}, VERSIONS),
    ("serve", {**_SERVE, "model_dir": "missing"}, _DOES_NOT_EXIST),
    ("serve", {**_SERVE, "model_dir": "empty"},
     ["empty holds no model", "nor a Hugging Face model directory"]),
    ("serve", {**_SERVE, "model_dir": "sft_unfinished"}, ["merged holds no model"]),
]
# Controls, run last: inputs that pass every check reach Ray, so the probe does see a start.
CONTROLS = [("warm", _WARM), ("serve", _SERVE)]


def _args(stage: str, options: dict[str, str], dirs: dict[str, str]) -> list[str]:
    args = [stage] + (["--out", dirs["out"]] if stage == "index" else [])
    for opt, key in options.items():
        args += [f"--{opt.replace('_', '-')}", dirs[key]]
    return args + (["--store-url", f"sqlite:///{dirs['out']}.db"] if stage != "index" else [])


def test_index_warm_serve_fail_fast_without_starting_ray(dirs):
    """Each wrong input of ``leadre index`` / ``warm`` / ``serve`` (a missing directory,
    another stage's output, an S-ID version that differs, an index outside its root, a model
    directory without a model) is refused through ``leadre.cli.main`` with exit 2 and one line
    naming the directory and the fault, in a process where no Ray cluster was started or
    joined. Valid inputs, in the same process, do reach ``ray.init``."""
    cases = [(stage, options) for stage, options, _ in FAIL_FAST] + CONTROLS
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-c", _PROBE,
                           json.dumps([_args(stage, o, dirs) for stage, o in cases])],
                          check=False, capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (stage, options, names), r in zip(FAIL_FAST, results):
        shown = " ".join(f"{k}={Path(dirs[v]).name}" for k, v in options.items())
        print(f"\nleadre {stage} {shown}\n  -> rc {r['rc']} in {r['s']} s: {r['err']}")
        assert r["rc"] == 2, r
        assert r["err"].startswith(f"leadre {stage}: error: ") and "\n" not in r["err"]
        for name in names:
            assert name in r["err"], (name, r["err"])
        assert r["ray_init_calls"] == 0 and not r["ray_initialized"], r
    for (stage, _), r in zip(CONTROLS, results[len(FAIL_FAST):]):
        print(f"\ncontrol: leadre {stage} on valid inputs -> {r['rc']}: {r['err']}")
        # a quiet stage (warm) reports the failure in one line and exits 1; serve raises it
        assert r["rc"] == "RuntimeError: ray.init was called" or (
            r["rc"] == 1 and "error: RuntimeError: ray.init was called" in r["err"]), r


def test_a_relative_input_directory_is_recorded_absolute(tmp_path, monkeypatch):
    """Later stages and their Ray workers (which run elsewhere) read inputs from the record."""
    from leadre.artifacts import read_manifest, write_manifest
    from leadre.stages import recorded_input

    (tmp_path / "runs" / "sids").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    write_manifest("runs/prompts", "prompts", inputs={"sids_dir": "runs/sids",
                                                       "source": "lcrec", "uri": "s3://b/x"},
                   config={}, counts={}, timings={})
    assert recorded_input("runs/prompts", "sids_dir") == str(tmp_path / "runs" / "sids")
    inputs = read_manifest("runs/prompts")["inputs"]
    assert inputs["source"] == "lcrec" and inputs["uri"] == "s3://b/x"  # not paths: unchanged
