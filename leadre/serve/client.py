"""A small HTTP client of ``POST /recommend`` (standard library only) that retries what a
single fault loses.

``/recommend`` is idempotent: it reads the store and queues the user for generation, and
queueing twice is queueing once. So a request that dies with its replica (a killed or
crashed Matcher answers 500 for the requests it held; a dropped connection gives none),
or that a replica sheds under overload (503), is sent again, after a short backoff, to
whichever replica Serve routes it to next. 4xx answers are never retried: the request is wrong.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

RETRY_STATUS = frozenset({500, 502, 503, 504})


@dataclass
class Answer:
    status: int  # the last attempt's HTTP status; 0: no answer at all (connection failed)
    body: dict | None  # the JSON answer of a 200
    attempts: int
    error: str = ""  # the last failed attempt's status line or exception


@dataclass
class RecommendClient:
    """One keep-alive connection to ``base_url`` (e.g. ``http://127.0.0.1:8000``); not
    thread-safe (one per thread).

    Parameters:
        retries: extra attempts after a connection error or a 5xx.
        backoff_s: wait before the first retry, doubled for each further one.
        timeout_s: socket timeout of one attempt: a request held by a replica that died
            can go unanswered, and is retried after this.
        on_retry: called with the failed attempt's error before each retry (for counting).
    """

    base_url: str
    retries: int = 2
    backoff_s: float = 0.05
    timeout_s: float = 2.0
    on_retry: Callable[[str], None] | None = None
    _conn: http.client.HTTPConnection | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port][/prefix], got "
                             f"{self.base_url!r}")
        self._url = url
        self._prefix = url.path.rstrip("/")

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._url.scheme == "https" \
                else http.client.HTTPConnection
            self._conn = cls(self._url.hostname, self._url.port, timeout=self.timeout_s)
        return self._conn

    def _attempt(self, body: bytes) -> tuple[int, bytes]:
        conn = self._connection()
        try:
            conn.request("POST", f"{self._prefix}/recommend", body=body,
                         headers={"content-type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()  # a fresh connection next time
            raise
        if resp.will_close:
            self.close()
        return resp.status, data

    def recommend(self, user_id: str, k: int = 10,
                  recent_events: list[dict] | None = None) -> Answer:
        body = json.dumps({"user_id": user_id, "k": k,
                           **({"recent_events": recent_events} if recent_events else {})}
                          ).encode()
        error = ""
        for attempt in range(1, self.retries + 2):
            status = 0
            try:
                status, data = self._attempt(body)
                if status == 200:
                    return Answer(200, json.loads(data), attempt)
                error = f"{status}: {data[:200].decode(errors='replace')}"
                if status not in RETRY_STATUS:
                    return Answer(status, None, attempt, error)
            except (OSError, http.client.HTTPException) as e:
                error = repr(e)
            if attempt <= self.retries:
                if self.on_retry:
                    self.on_retry(error)
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        return Answer(status, None, self.retries + 1, error)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "RecommendClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
