"""A Ray Data worker SIGKILLed in the middle of ``leadre ingest``: the job either completes
with every input row accounted for (rows in = clean + quarantined, counted independently from
the raw files and from the tables written) or fails loudly without a manifest. It never leaves
a partial clean table that looks complete."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pyarrow.compute as pc
import pytest

from leadre import artifacts
from leadre.data.config import IngestConfig
from leadre.data.ingest import run
from leadre.data.config import SynthConfig
from leadre.data.synth import run as synth_run
from leadre.runtime import RayConfig


class WorkerKiller(threading.Thread):
    """SIGKILLs, once, a worker of this test session's Ray node (a descendant of its raylet,
    never another cluster's process) when it starts running a task whose process title
    contains ``title`` for the ``nth`` time."""

    def __init__(self, raylet_pid: int, title: str, nth: int = 1, timeout: float = 300):
        super().__init__(daemon=True)
        self.raylet, self.title, self.nth, self.timeout = raylet_pid, title, nth, timeout
        self.stopped = threading.Event()
        self.starts = 0
        self.killed: dict | None = None
        self.t0 = time.time()

    def _running(self) -> dict[int, str]:
        out = {}
        for p in psutil.Process(self.raylet).children(recursive=True):
            try:
                title = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if self.title in title:
                out[p.pid] = title
        return out

    def run(self) -> None:
        before: set[int] = set()
        while not self.stopped.is_set() and time.time() - self.t0 < self.timeout:
            running = self._running()
            for pid in sorted(set(running) - before):  # a worker started such a task
                self.starts += 1
                if self.starts == self.nth:
                    os.kill(pid, signal.SIGKILL)
                    self.killed = {"pid": pid, "title": running[pid].strip(),
                                   "after_s": round(time.time() - self.t0, 2)}
                    return
            before = set(running)
            time.sleep(0.01)


def _raylet_pid(ray) -> int:
    node = ray._private.worker._global_node  # the node this test session started
    raylets = node.all_processes.get("raylet") if node is not None else None
    if not raylets:
        pytest.skip("the session joined a cluster it did not start: its workers are not "
                    "this test's to kill")
    return raylets[0].process.pid


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("faulty_world")
    synth_run(SynthConfig(out=str(out), users=300, ads=120, corrupt_share=0.02, seed=1))
    return out, {t: artifacts.read_table(out, t).num_rows for t in ("ads", "users", "events")}


# ads and users are one validation task each (they run first, one after the other): the
# third `_validate_batch` task is one of the events'. `_dedupe_and_write_shard` runs on each
# user shard of the clean events (and writes its file).
@pytest.mark.parametrize("title,nth", [("MapBatches(_validate_batch)", 3),
                                       ("MapBatches(_dedupe_and_write_shard)", 1)],
                         ids=["validate_events", "dedupe_events"])
def test_worker_killed_mid_ingest_loses_no_row_or_fails_without_manifest(
        ray_local, world, tmp_path, title, nth):
    src, raw_rows = world
    out = tmp_path / "ingest"
    killer = WorkerKiller(_raylet_pid(ray_local), title, nth)
    killer.start()
    t0 = time.time()
    error = None
    try:
        run(IngestConfig(input_dir=str(src), out=str(out), ray=RayConfig(num_cpus=2),
                         batch_size=500))
    except Exception as e:  # a loud failure is an accepted outcome, checked below
        error = e
    finally:
        killer.stopped.set()
        killer.join(5)
    seconds = time.time() - t0
    assert killer.killed, f"no worker ran {title!r} {nth} time(s) (saw {killer.starts})"
    print(f"\nkilled worker pid {killer.killed['pid']} ({killer.killed['title']}) "
          f"{killer.killed['after_s']} s into the ingest, task start #{nth} of {title}")
    if error is not None:
        print(f"ingest failed after {seconds:.1f} s: {type(error).__name__}: "
              f"{str(error).splitlines()[0]}")
        assert not (out / artifacts.MANIFEST).exists()
        return
    counts = artifacts.read_manifest(out, stage="ingest")["counts"]
    quarantine = artifacts.read_table(out, "quarantine")
    for table, n_raw in raw_rows.items():
        c = counts[table]
        written = artifacts.read_table(out, table).num_rows
        q = quarantine.filter(pc.equal(quarantine.column("table"), table)).num_rows
        print(f"{table}: {n_raw} raw rows in; {written} clean written, {q} quarantined "
              f"(manifest: {c['rows_in']} in, {c['clean']} clean, {c['quarantined']} quarantined)")
        assert c["rows_in"] == n_raw == written + q
        assert (c["clean"], c["quarantined"]) == (written, q)
    print(f"ingest completed in {seconds:.1f} s despite the kill (Ray Data retried the task)")
