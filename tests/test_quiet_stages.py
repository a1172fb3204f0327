"""A stage run on its own is as quiet as the demo: `leadre sft` (a real 3-step run of the tiny
model on Ray Train, a local Ray cluster of its own) prints the project's lines and nothing of
the libraries (Ray's workers, warnings, progress bars), which go to a log file; `--verbose`
prints them on the terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_data import write_prompts  # noqa: E402

LEADRE = str(Path(sys.executable).parent / "leadre")
ANSI = re.compile(r"\x1b\[")
# "(RayTrainWorker pid=123)", "(pid=123)", "(TrainController pid=123, ip=...)"
WORKER_PREFIX = re.compile(r"\((?:\w+ )?pid=\d+")
PY_WARNING = re.compile(r"\b[A-Z]\w*Warning\b")  # FutureWarning, UserWarning, ...
PROJECT_LINE = re.compile(r"^\d\d:\d\d:\d\d ")  # the quiet terminal's format of leadre lines


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    return str(write_prompts(tmp_path_factory.mktemp("quiet_world"), n_users=40)["prompts"])


def _sft(prompts: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`leadre sft` as a user runs it: its own process and its own local Ray cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.time()
    r = subprocess.run(
        [LEADRE, "sft", f"--prompts-dir={prompts}", f"--out={out}", "--preset=tiny",
         "--max-steps=3", "--save-steps=3", "--num-workers=1", "--cpus-per-worker=1",
         "--ray.num-cpus=2", "--progress-every-s=1", *extra],
        capture_output=True, text=True, timeout=300, env={**env, "RAY_USAGE_STATS_ENABLED": "0"})
    print(f"\nleadre sft {' '.join(extra)}: rc {r.returncode} in {time.time() - t0:.0f} s; "
          f"terminal:\n{r.stderr}")
    return r


def test_a_stage_alone_prints_its_own_lines_and_logs_the_libraries(prompts, tmp_path):
    out = tmp_path / "sft"
    r = _sft(prompts, out)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 3  # stdout: the summary, as before
    terminal = r.stderr
    assert not ANSI.search(terminal), "colour codes"
    assert not WORKER_PREFIX.search(terminal), "Ray worker output"
    assert not PY_WARNING.search(terminal), "Python warnings"
    assert "\r" not in terminal, "progress bars"
    log_file = tmp_path / "logs" / "sft.log"  # beside the stage's directory
    lines = terminal.splitlines()
    assert lines[0] == f"library logs: {log_file} (--verbose prints them here)"
    assert all(PROJECT_LINE.match(line) for line in lines[1:]), lines
    assert any("sft: step 3/3" in line for line in lines)  # the driver's progress line
    text = log_file.read_text()
    assert text.startswith("leadre sft ") and "sft: step 3/3" in text
    assert "Ray workers' logs: " in text


def test_verbose_prints_the_libraries_output(prompts, tmp_path):
    r = _sft(prompts, tmp_path / "sft", "--verbose")
    assert r.returncode == 0, r.stderr
    assert WORKER_PREFIX.search(r.stderr), "the Ray workers' output"
    assert "library logs:" not in r.stderr
    assert not (tmp_path / "logs").exists()
