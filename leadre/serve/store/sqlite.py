"""The embedded SQLite backend of the candidate store (``sqlite:///path.db``): no server, WAL
mode so several replica processes on one node share it, durable across an app restart."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from leadre.serve.store.base import _ADS_VERSION_KEY, CandidateRecord, CandidateStore, _expiry


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

    def enqueue(self, user_ids, priority=False):
        now = time.time()
        # priority: enqueued "at time 0", ahead of every ordinary entry, and claimable now
        rows = [(u, 0.0 if priority else now, now) for u in dict.fromkeys(user_ids)]
        if not priority:
            return self._tx(lambda db: sum(db.execute(
                "INSERT OR IGNORE INTO queue VALUES (?, ?, ?)", r).rowcount for r in rows))

        def put(db):
            new = sum(db.execute("INSERT OR IGNORE INTO queue VALUES (?, ?, ?)", r).rowcount
                      for r in rows)
            db.executemany("UPDATE queue SET enqueued_at = 0 WHERE user_id = ?",
                           [(u,) for u, *_ in rows])
            return new
        return self._tx(put)

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

    def users_not_of_model(self, model_version):
        with self._lock:
            rows = self._db.execute("SELECT user_id, record FROM candidates WHERE expires_at > ?",
                                    (time.time(),)).fetchall()
        return [u for u, raw in rows
                if CandidateRecord.from_json(raw).model_version != model_version]

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
