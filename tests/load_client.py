"""A bounded load client for the serving tests: a few threads on 127.0.0.1, each sending one
``POST /recommend`` at a time with a pause between (through :mod:`leadre.serve.client`),
recording every answer (status, send time, latency). Nothing is retried unless a test asks
for it, and then every failed attempt is counted."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import numpy as np

from leadre.serve.client import RecommendClient


@dataclass
class Sent:
    t: float  # when the request was sent (time.time())
    latency_ms: float
    status: int | str  # an HTTP status, or "exception"
    body: dict | None


class Load:
    """``threads`` loops sending ``/recommend`` for ``users`` (round robin) until the ``with``
    block ends; ``pause_s`` between requests of a thread bounds the rate. ``retries``: extra
    attempts a request gets after a connection error or a 5xx
    (:class:`~leadre.serve.client.RecommendClient`), each failed attempt counted in
    ``retried``."""

    def __init__(self, base: str, users: list[str], threads: int = 3, pause_s: float = 0.01,
                 retries: int = 0, timeout_s: float = 30.0):
        self.base, self.users = base, users
        self.pause_s, self.retries, self.timeout_s = pause_s, retries, timeout_s
        self.log: list[Sent] = []
        self.retried: list[str] = []  # failed attempts that were retried
        self.errors: list[str] = []  # requests that failed (after their retries)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True)
                         for i in range(threads)]

    def _loop(self, i: int) -> None:
        def retried(error: str) -> None:
            with self._lock:
                self.retried.append(error)

        with RecommendClient(self.base, retries=self.retries, timeout_s=self.timeout_s,
                             on_retry=retried) as c:
            n = 0
            while not self._stop.is_set():
                uid = self.users[(i * 7919 + n) % len(self.users)]
                n += 1
                t, t0 = time.time(), time.perf_counter()
                a = c.recommend(uid, 10)
                sent = Sent(t, (time.perf_counter() - t0) * 1000,
                            a.status if a.status else "exception", a.body)
                with self._lock:
                    self.log.append(sent)
                    if a.status != 200:
                        self.errors.append(a.error)
                time.sleep(self.pause_s)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    # --- what was counted ------------------------------------------------------------------

    @property
    def codes(self) -> Counter:
        return Counter(s.status for s in self.log)

    @property
    def total(self) -> int:
        return len(self.log)

    @property
    def failed(self) -> int:
        return sum(1 for s in self.log if s.status != 200)

    @property
    def answers(self) -> list[dict]:
        return [s.body for s in self.log if s.status == 200]

    @property
    def sent(self) -> list[float]:
        return [s.t for s in self.log if s.status == 200]

    def between(self, t0: float, t1: float) -> list[Sent]:
        return [s for s in self.log if t0 <= s.t < t1]

    def report(self, what: str, t0: float | None = None, t1: float | None = None) -> dict:
        """Counts of the whole run and latency percentiles of the requests sent in
        [t0, t1) (the fault window), printed as one line and returned."""
        window = self.between(t0 or 0.0, t1 or float("inf"))
        lat = np.array([s.latency_ms for s in window]) if window else np.zeros(1)
        out = {"sent": self.total, "failed": self.failed, "retried_attempts": len(self.retried),
               "codes": dict(self.codes), "fault_window_requests": len(window),
               "fault_window_failed": sum(1 for s in window if s.status != 200),
               "p50_ms": round(float(np.percentile(lat, 50)), 1),
               "p99_ms": round(float(np.percentile(lat, 99)), 1),
               "max_ms": round(float(lat.max()), 1)}
        print(f"\n[{what}] {out}", flush=True)
        return out


def replica_actors(ray, app: str, deployment: str) -> list[tuple[str, str]]:
    """(name, actor id) of the live replicas of ``deployment`` in ``app`` (named actors in the
    "serve" namespace; no state-API address lookup, other clusters may share the host)."""
    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "serve" and f"{app}#" in a["name"] and deployment in a["name"]:
            try:
                h = ray.get_actor(a["name"], namespace="serve")
            except ValueError:
                continue
            out.append((a["name"], h._actor_id.hex()))
    return sorted(out)


def wait_http(url: str, timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200 (a deployment coming up), or raise after ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} never answered 200")
