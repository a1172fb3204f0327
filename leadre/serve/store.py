"""The candidate store between the two serving tiers.

The generator (latency-tolerant) writes each user's generated S-IDs here with a TTL and the
model / S-ID versions that produced them; the matcher (latency-sensitive) reads them on every
request. The store also holds each user's serving context (profile + recent events, written by
``ray_jobs/warm_cache.py``), which the matcher uses for real-time ANN queries on a cache miss
and the generator uses to build the prompt, and a durable queue of users waiting for
generation (so a generator replica that dies loses nothing: its claims expire and another
replica takes them), and the *live ad status*: ads switched off since the index was built
(budget spent, paused), with a version counter every matcher replica polls, so a change
reaches all of them within a second or two without an index rebuild.

Two backends behind one interface, chosen by URL (``open_store``):

- ``sqlite:///path/store.db`` (or a bare path): the embedded default. No server; WAL mode so
  several replica processes on one node share it; durable across an app restart.
- ``redis://host:port/db``: production (:mod:`leadre.serve.store_redis`). Candidates use
  Redis' own key expiry; the queue is a sorted set claimed atomically with a Lua script.

Records are small JSON documents; only ids cross process boundaries.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

DEFAULT_URL = "sqlite:///runs/store/candidates.db"
_ADS_VERSION_KEY = "ads_status_version"  # SQLite meta row holding the ad-status version


@dataclass
class CandidateRecord:
    """Generated candidates of one user. ``sids`` are best first, ``scores`` aligned (higher
    is better, e.g. beam log-probabilities). ``expires_at``/``created_at`` are UNIX seconds."""

    user_id: str
    sids: list[str]
    scores: list[float]
    model_version: str
    sid_version: str
    created_at: float = field(default_factory=time.time)
    expires_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "CandidateRecord":
        return cls(**json.loads(raw))

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at <= (time.time() if now is None else now)


class StoreUnavailable(RuntimeError):
    """The store cannot be reached now (a server restarting, a network blip): callers on the
    request path answer without it (the matcher's ANN fallback) instead of failing, and the
    next call after the backend's back-off tries again."""


class CandidateStore(ABC):
    """Candidates (with TTL + versions), user contexts and the pending-generation queue."""

    url: str

    # --- candidates -----------------------------------------------------------------------
    def put(self, rec: CandidateRecord, ttl_s: float | None = None) -> None:
        self.put_many([rec], ttl_s)

    @abstractmethod
    def put_many(self, recs: Iterable[CandidateRecord], ttl_s: float | None = None) -> int:
        """Write records; ``ttl_s`` (if given) sets ``expires_at = now + ttl_s``."""

    def get(self, user_id: str) -> CandidateRecord | None:
        return self.get_many([user_id]).get(user_id)

    @abstractmethod
    def get_many(self, user_ids: list[str]) -> dict[str, CandidateRecord]:
        """Unexpired records of the users that have one."""

    @abstractmethod
    def delete(self, user_ids: list[str]) -> int: ...

    @abstractmethod
    def count(self) -> int:
        """Unexpired candidate records."""

    # --- user contexts (profile + recent events) -----------------------------------------
    @abstractmethod
    def put_users(self, contexts: dict[str, dict[str, Any]]) -> int: ...

    def get_user(self, user_id: str) -> dict[str, Any] | None:
        return self.get_users([user_id]).get(user_id)

    @abstractmethod
    def get_users(self, user_ids: list[str]) -> dict[str, dict[str, Any]]: ...

    # --- pending-generation queue --------------------------------------------------------
    @abstractmethod
    def enqueue(self, user_ids: Iterable[str]) -> int:
        """Queue users for generation; returns how many were not queued already."""

    @abstractmethod
    def claim(self, n: int, lease_s: float = 60.0) -> list[str]:
        """Take up to ``n`` queued users, oldest first; they become claimable again after
        ``lease_s`` unless acked (a dead worker's claims come back)."""

    @abstractmethod
    def ack(self, user_ids: Iterable[str]) -> int:
        """Remove users from the queue (their generation is done)."""

    @abstractmethod
    def queue_depth(self) -> int: ...

    # --- live ad status (ads switched off after the index was built) ----------------------
    @abstractmethod
    def set_ads_active(self, ad_ids: Iterable[str], active: bool) -> int:
        """Switch ads off (``active=False``) or back on; returns the new status version."""

    @abstractmethod
    def inactive_ads(self) -> tuple[int, set[str]]:
        """(status version, ids of the ads switched off), read consistently."""

    @abstractmethod
    def ads_status_version(self) -> int:
        """Bumped by every :meth:`set_ads_active`; 0 before the first change."""

    # --- small settings shared by all replicas (e.g. the index directory in use) -------------
    @abstractmethod
    def set_meta(self, key: str, value: str) -> None: ...

    @abstractmethod
    def get_meta(self, key: str) -> str | None: ...

    @abstractmethod
    def clear(self) -> None:
        """Delete everything (tests, re-warming from scratch)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _expiry(rec: CandidateRecord, ttl_s: float | None, now: float) -> CandidateRecord:
    if ttl_s is not None:
        rec.expires_at = now + float(ttl_s)
    elif rec.expires_at <= 0:
        raise ValueError(f"candidate record of {rec.user_id!r} has no expires_at and no ttl_s")
    return rec


class SqliteStore(CandidateStore):
    """Embedded store in one SQLite file (WAL). Safe for several processes on one host."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.url = f"sqlite:///{self.path}"
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS candidates (
                user_id TEXT PRIMARY KEY, record TEXT NOT NULL, expires_at REAL NOT NULL);
            CREATE INDEX IF NOT EXISTS candidates_expiry ON candidates(expires_at);
            CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, context TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS queue (
                user_id TEXT PRIMARY KEY, enqueued_at REAL NOT NULL, available_at REAL NOT NULL);
            CREATE INDEX IF NOT EXISTS queue_available ON queue(available_at, enqueued_at);
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS ads_off (ad_id TEXT PRIMARY KEY, since REAL NOT NULL);
        """)

    def _tx(self, fn):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return out

    def put_many(self, recs, ttl_s=None):
        now = time.time()
        rows = [(r.user_id, r.to_json(), r.expires_at)
                for r in (_expiry(r, ttl_s, now) for r in recs)]
        self._tx(lambda db: db.executemany(
            "INSERT OR REPLACE INTO candidates VALUES (?, ?, ?)", rows))
        return len(rows)

    def get_many(self, user_ids):
        out: dict[str, CandidateRecord] = {}
        now = time.time()
        with self._lock:
            for i in range(0, len(user_ids), 500):
                chunk = list(user_ids[i:i + 500])
                q = ",".join("?" * len(chunk))
                for uid, raw in self._db.execute(
                        f"SELECT user_id, record FROM candidates WHERE user_id IN ({q}) "
                        "AND expires_at > ?", (*chunk, now)):
                    out[uid] = CandidateRecord.from_json(raw)
        return out

    def delete(self, user_ids):
        ids = [(u,) for u in user_ids]
        return self._tx(lambda db: db.executemany(
            "DELETE FROM candidates WHERE user_id = ?", ids).rowcount)

    def purge_expired(self) -> int:
        return self._tx(lambda db: db.execute(
            "DELETE FROM candidates WHERE expires_at <= ?", (time.time(),)).rowcount)

    def count(self):
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM candidates WHERE expires_at > ?",
                                    (time.time(),)).fetchone()[0]

    def put_users(self, contexts):
        rows = [(u, json.dumps(c, separators=(",", ":"), default=str))
                for u, c in contexts.items()]
        self._tx(lambda db: db.executemany("INSERT OR REPLACE INTO users VALUES (?, ?)", rows))
        return len(rows)

    def get_users(self, user_ids):
        out = {}
        with self._lock:
            for i in range(0, len(user_ids), 500):
                chunk = list(user_ids[i:i + 500])
                q = ",".join("?" * len(chunk))
                for uid, raw in self._db.execute(
                        f"SELECT user_id, context FROM users WHERE user_id IN ({q})", chunk):
                    out[uid] = json.loads(raw)
        return out

    def enqueue(self, user_ids):
        now = time.time()
        rows = [(u, now, now) for u in dict.fromkeys(user_ids)]
        return self._tx(lambda db: sum(
            db.execute("INSERT OR IGNORE INTO queue VALUES (?, ?, ?)", r).rowcount for r in rows))

    def claim(self, n, lease_s=60.0):
        now = time.time()

        def take(db):
            ids = [r[0] for r in db.execute(
                "SELECT user_id FROM queue WHERE available_at <= ? "
                "ORDER BY enqueued_at LIMIT ?", (now, int(n)))]
            db.executemany("UPDATE queue SET available_at = ? WHERE user_id = ?",
                           [(now + lease_s, u) for u in ids])
            return ids
        return self._tx(take)

    def ack(self, user_ids):
        ids = [(u,) for u in user_ids]
        return self._tx(lambda db: db.executemany(
            "DELETE FROM queue WHERE user_id = ?", ids).rowcount)

    def queue_depth(self):
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]

    def set_ads_active(self, ad_ids, active):
        rows = [(a,) for a in dict.fromkeys(ad_ids)]
        now = time.time()

        def change(db):
            if active:
                db.executemany("DELETE FROM ads_off WHERE ad_id = ?", rows)
            else:
                db.executemany("INSERT OR IGNORE INTO ads_off VALUES (?, ?)",
                               [(a, now) for (a,) in rows])
            version = self._status_version(db) + 1
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                       (_ADS_VERSION_KEY, str(version)))
            return version
        return self._tx(change)

    @staticmethod
    def _status_version(db) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (_ADS_VERSION_KEY,)).fetchone()
        return int(row[0]) if row else 0

    def inactive_ads(self):
        return self._tx(lambda db: (self._status_version(db), {
            r[0] for r in db.execute("SELECT ad_id FROM ads_off")}))

    def ads_status_version(self):
        with self._lock:
            return self._status_version(self._db)

    def set_meta(self, key, value):
        self._tx(lambda db: db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value)))

    def get_meta(self, key):
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def clear(self):
        self._tx(lambda db: [db.execute(f"DELETE FROM {t}") for t in
                             ("candidates", "users", "queue", "meta", "ads_off")])

    def close(self):
        with self._lock:
            self._db.close()


def open_store(url: str | None = None) -> CandidateStore:
    """``sqlite:///relative/or//abs/path.db``, a bare file path, or ``redis://host:port/db``
    (``rediss://`` for TLS). Default: $LEADRE_STORE_URL, else :data:`DEFAULT_URL`."""
    url = url or os.environ.get("LEADRE_STORE_URL") or DEFAULT_URL
    if url.startswith(("redis://", "rediss://", "unix://")):
        from leadre.serve.store_redis import RedisStore

        return RedisStore(url)
    if url.startswith("sqlite://"):
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url[len("sqlite://"):]
        return SqliteStore(path or ":memory:")
    if "://" in url:
        raise ValueError(f"unsupported store URL {url!r}: use sqlite:///path.db or redis://host:port/0")
    return SqliteStore(url)


def __getattr__(name: str):
    # ``RedisStore`` lives in its own module (the ``redis`` package is an optional extra).
    if name == "RedisStore":
        from leadre.serve.store_redis import RedisStore

        return RedisStore
    raise AttributeError(name)
