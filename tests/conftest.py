"""Shared fixtures: one local Ray cluster per test session (startup costs ~10 s), helpers to
start a separate `ray start --head` cluster, and the location of the real datasets."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Data's progress bars flood captured test output; progress is tested by the demo.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("LEADRE_DATASETS", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def ray_local():
    """A 2-CPU local Ray cluster shared by every test of the session."""
    import ray

    from leadre.runtime import RayConfig, init_ray

    init_ray(RayConfig(num_cpus=2, object_store_mb=300))
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HeadNode:
    """A `ray start --head --block` process group on 127.0.0.1 that only this test owns.
    (`ray stop` would also kill the session's shared cluster.)"""

    def __init__(self, tmp: Path, num_cpus: int = 2):
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        bin_dir = str(Path(sys.executable).parent)
        # Jobs run `python ...`: it must be this environment's python.
        self.env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.log = open(tmp / "ray_head.log", "w")
        # Unix socket paths are limited to 107 bytes: pytest's tmp_path is too deep.
        self.temp_dir = tempfile.mkdtemp(prefix="leadre-ray-", dir="/tmp")
        self.proc = subprocess.Popen(
            [str(Path(bin_dir) / "ray"), "start", "--head", "--block", f"--port={self.port}",
             f"--num-cpus={num_cpus}", "--object-store-memory=300000000",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
             # The agent's default port 52365 is taken by the session's own cluster: jobs
             # would fail with "No available agent to submit job".
             f"--dashboard-agent-listen-port={free_port()}"],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        import urllib.error
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:  # 401 without a token: the dashboard is up
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError("Ray head did not come up")

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        # `ray start --block` survives SIGTERM after its children exit: make sure.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head(tmp_path):
    head = HeadNode(tmp_path)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="session")
def scientific_dir() -> Path:
    d = DATASETS / "scientific"
    if not (d / "Scientific.inter.json").exists():
        pytest.skip(f"real dataset not found at {d} (set LEADRE_DATASETS)")
    return d


@pytest.fixture(scope="session")
def beauty_dir() -> Path:
    d = DATASETS / "beauty"
    if not (d / "Beauty.inter.json").exists():
        pytest.skip(f"real dataset not found at {d} (set LEADRE_DATASETS)")
    return d


def kill_session(leader_pid: int) -> None:
    """Kill every process of the session ``leader_pid`` leads (a ``leadre serve`` started
    with ``start_new_session``), not only its process group: Ray's HAProxy runs in a group of
    its own and outlived a failed run's killpg."""
    import psutil

    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == leader_pid:
                p.kill()
        except (psutil.Error, OSError):
            pass
