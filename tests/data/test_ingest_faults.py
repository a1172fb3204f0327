"""A Ray Data worker SIGKILLed in the middle of ``leadre ingest``: Ray Data retries the task,
and the job completes with exactly the output of an undisturbed run of the same input (the same
clean rows, the same quarantine, the same manifest counts, every input row accounted for). A
run that fails, or that completes with a row lost or written twice, fails the test."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pyarrow.compute as pc
import pytest

from leadre import artifacts
from leadre.data import schema
from leadre.data.config import IngestConfig, SynthConfig
from leadre.data.ingest import run
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


def _ingest(src, out) -> dict:
    return run(IngestConfig(input_dir=str(src), out=str(out), ray=RayConfig(num_cpus=2),
                            batch_size=500))


_SORT = {"ads": ["ad_id"], "users": ["user_id"], "events": list(schema.EVENT_IDENTITY),
         "quarantine": ["table", "reason", "detail", "row"]}


def _output(out) -> dict:
    """What an ingest wrote, in a canonical order: every table and the manifest's counts."""
    tables = {name: artifacts.read_table(out, name).sort_by([(c, "ascending") for c in keys])
              for name, keys in _SORT.items()}
    return {"counts": artifacts.read_manifest(out, stage="ingest")["counts"], **tables}


@pytest.fixture(scope="module")
def undisturbed(ray_local, world, tmp_path_factory) -> dict:
    """The reference: the same input ingested with no fault."""
    out = tmp_path_factory.mktemp("undisturbed") / "ingest"
    _ingest(world[0], out)
    return _output(out)


# ads and users are one validation task each (they run first, one after the other): the
# third `_validate_batch` task is one of the events'. `_dedupe_and_write_shard` runs on each
# user shard of the clean events (and writes its file).
@pytest.mark.parametrize("title,nth", [("MapBatches(_validate_batch)", 3),
                                       ("MapBatches(_dedupe_and_write_shard)", 1)],
                         ids=["validate_events", "dedupe_events"])
def test_worker_killed_mid_ingest_completes_with_the_exact_output(
        ray_local, world, undisturbed, tmp_path, title, nth):
    src, raw_rows = world
    out = tmp_path / "ingest"
    killer = WorkerKiller(_raylet_pid(ray_local), title, nth)
    killer.start()
    t0 = time.time()
    try:
        _ingest(src, out)  # must complete: a failed ingest fails the test
    finally:
        killer.stopped.set()
        killer.join(5)
    seconds = time.time() - t0
    assert killer.killed, f"no worker ran {title!r} {nth} time(s) (saw {killer.starts})"
    print(f"\nkilled worker pid {killer.killed['pid']} ({killer.killed['title']}) "
          f"{killer.killed['after_s']} s into the ingest, task start #{nth} of {title}; "
          f"the ingest completed in {seconds:.1f} s (Ray Data retried the task)")
    got = _output(out)
    counts = got["counts"]
    for table, n_raw in raw_rows.items():
        c = counts[table]
        q = got["quarantine"].filter(pc.equal(got["quarantine"].column("table"), table))
        print(f"{table}: {n_raw} raw rows in; {got[table].num_rows} clean written, "
              f"{q.num_rows} quarantined (manifest: {c['rows_in']} in, {c['clean']} clean, "
              f"{c['quarantined']} quarantined {c['by_reason']})")
        assert c["rows_in"] == n_raw == got[table].num_rows + q.num_rows
        assert c["clean"] + sum(c["by_reason"].values()) == n_raw
    # exactly the undisturbed run's output: no row lost, none written twice
    assert counts == undisturbed["counts"]
    for name in _SORT:
        assert got[name].equals(undisturbed[name]), f"{name} differs from the undisturbed run"
