"""Append a benchmark section to bench/RESULTS.md: date, machine, exact command, numbers."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines()
                      if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    gpu = ""
    try:
        import torch
        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores ({cpu}){mem}{gpu}, Python {platform.python_version()}"


def append(title: str, body: str) -> None:
    cmd = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## {title}\n\n- date: {stamp}\n- machine: {machine()}\n"
               f"- command: `{cmd}`\n\n{body.strip()}\n")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in bench/; newest last.\n")
    with RESULTS.open("a") as f:
        f.write(section)
    print(section)
