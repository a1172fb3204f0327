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
- ``redis://host:port/db``: production (:mod:`leadre.serve.store.redis`). Candidates use
  Redis' own key expiry; the queue is a sorted set claimed atomically with a Lua script.

Records are small JSON documents; only ids cross process boundaries.

Modules: ``base`` (the record, the interface, the errors), ``sqlite`` and ``redis`` (one
backend each, importing only ``base``); this package's ``open_store`` picks one by URL.
"""
from __future__ import annotations

import os

from leadre.serve.store.base import (DEFAULT_URL, CandidateRecord, CandidateStore,
                                     StoreUnavailable)
from leadre.serve.store.sqlite import SqliteStore

__all__ = ["DEFAULT_URL", "CandidateRecord", "CandidateStore", "RedisStore", "SqliteStore",
           "StoreUnavailable", "open_store"]


def open_store(url: str | None = None) -> CandidateStore:
    """``sqlite:///relative/or//abs/path.db``, a bare file path, or ``redis://host:port/db``
    (``rediss://`` for TLS). Default: $LEADRE_STORE_URL, else :data:`DEFAULT_URL`."""
    url = url or os.environ.get("LEADRE_STORE_URL") or DEFAULT_URL
    if url.startswith(("redis://", "rediss://", "unix://")):
        from leadre.serve.store.redis import RedisStore

        return RedisStore(url)
    if url.startswith("sqlite://"):
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url[len("sqlite://"):]
        return SqliteStore(path or ":memory:")
    if "://" in url:
        raise ValueError(f"unsupported store URL {url!r}: use sqlite:///path.db or redis://host:port/0")
    return SqliteStore(url)


def __getattr__(name: str):
    # ``RedisStore`` is imported on first use: the ``redis`` package is an optional extra.
    if name == "RedisStore":
        from leadre.serve.store.redis import RedisStore

        return RedisStore
    raise AttributeError(name)
