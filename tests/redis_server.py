"""A real ``redis-server`` on 127.0.0.1 and a free port, owned by one test module: started,
stopped and restarted on the same port and data directory (append-only file on, fsync on
every write, as a production store that must survive its own restart is run)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_port


class RedisServer:
    def __init__(self, data_dir: Path):
        self.exe = shutil.which("redis-server")
        if self.exe is None:
            pytest.skip("redis-server not installed: run scripts/install_redis.sh "
                        "(apt-get install redis-server) to run the Redis tests")
        self.port, self.dir = free_port(), data_dir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10) -> None:
        import redis

        self.proc = subprocess.Popen(
            [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir),
             "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        r = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.time() + timeout
        while True:
            try:
                r.ping()
                r.close()
                return
            except redis.ConnectionError:  # refused, or still loading its data
                if self.proc.poll() is not None:
                    pytest.fail(f"redis-server exited with {self.proc.returncode}")
                if time.time() > deadline:
                    pytest.fail("redis-server did not answer PING")
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="module")
def redis(tmp_path_factory) -> RedisServer:
    """A redis-server owned by the test module that imports this fixture."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
