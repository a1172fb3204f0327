"""Redis backend of the candidate store (``redis://host:port/db``): the production store every
replica on every node shares. Candidates use Redis' own key expiry; the queue is a sorted set
scored by "available at", claimed atomically with a Lua script.

A Redis that goes away (restart, failover, network) raises :class:`StoreUnavailable` from
every call, at once: after a failed call the store does not try the server again for
``retry_after_s``, so requests that fall back meanwhile pay no connect timeout. The first call
after that reconnects (redis-py opens a fresh connection for a pooled one that broke)."""

from __future__ import annotations

import functools
import json
import time

from leadre.serve.store.base import CandidateRecord, CandidateStore, StoreUnavailable, _expiry

# Atomically take up to ARGV[2] members available at ARGV[1] and push them to ARGV[3].
_CLAIM_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[3], id) end
return ids
"""


def _guarded(fn):
    """``fn`` raising :class:`StoreUnavailable` for an unreachable server (and at once while
    the back-off after the last failure lasts)."""
    import redis

    @functools.wraps(fn)
    def call(self: "RedisStore", *args, **kwargs):
        wait = self._down_until - time.monotonic()
        if wait > 0:
            raise StoreUnavailable(f"Redis at {self.url} unreachable ({self._down_reason}); "
                                   f"next try in {wait:.1f}s")
        try:
            return fn(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as e:  # BusyLoadingError too
            self._down_reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            self._down_until = time.monotonic() + self.retry_after_s
            raise StoreUnavailable(f"Redis at {self.url} unreachable: "
                                   f"{self._down_reason}") from e
    return call


def _guard_all(cls):
    """Every store operation of ``cls`` goes through :func:`_guarded`."""
    for name in CandidateStore.__abstractmethods__:
        setattr(cls, name, _guarded(getattr(cls, name)))
    return cls


@_guard_all
class RedisStore(CandidateStore):
    """Redis backend: ``<prefix>:cand:<user>`` strings with native expiry, ``<prefix>:user:<user>``
    contexts, ``<prefix>:queue`` sorted set (score = available-at; ties broken by the
    insertion-time hash ``<prefix>:queued``), ``<prefix>:ads_off`` set of switched-off ads
    with its version counter ``<prefix>:ads_off:version`` (changed together in MULTI).

    ``socket_timeout_s`` / ``connect_timeout_s`` bound one call on a server that hangs or a
    host that is gone; ``retry_after_s`` is the back-off after a failed call."""

    def __init__(self, url: str, prefix: str = "leadre", socket_timeout_s: float = 2.0,
                 connect_timeout_s: float = 1.0, retry_after_s: float = 0.5):
        try:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry
        except ImportError:
            raise RuntimeError("the Redis store needs the `redis` package: "
                               "pip install 'leadre[redis]'") from None
        self.url = url
        self.prefix = prefix
        self.retry_after_s = retry_after_s
        self._down_until, self._down_reason = 0.0, ""
        # One quick retry: a pooled connection broken by a server restart fails once, the
        # retry reconnects. Longer outages are the back-off's, not redis-py's, to wait out.
        self._r = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=connect_timeout_s,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1))
        self._claim = self._r.register_script(_CLAIM_LUA)
        self._q = f"{prefix}:queue"
        self._off, self._off_version = f"{prefix}:ads_off", f"{prefix}:ads_off:version"

    def _c(self, uid: str) -> str:
        return f"{self.prefix}:cand:{uid}"

    def _u(self, uid: str) -> str:
        return f"{self.prefix}:user:{uid}"

    def put_many(self, recs, ttl_s=None):
        now = time.time()
        n = 0
        with self._r.pipeline(transaction=False) as p:
            for r in recs:
                r = _expiry(r, ttl_s, now)
                ms = int((r.expires_at - now) * 1000)
                if ms <= 0:
                    p.delete(self._c(r.user_id))
                else:
                    p.set(self._c(r.user_id), r.to_json(), px=ms)
                n += 1
            p.execute()
        return n

    def get_many(self, user_ids):
        if not user_ids:
            return {}
        now = time.time()
        out = {}
        for uid, raw in zip(user_ids, self._r.mget([self._c(u) for u in user_ids])):
            if raw is not None:
                rec = CandidateRecord.from_json(raw)
                if not rec.expired(now):
                    out[uid] = rec
        return out

    def delete(self, user_ids):
        user_ids = list(user_ids)
        return int(self._r.delete(*[self._c(u) for u in user_ids])) if user_ids else 0

    def count(self):
        return sum(1 for _ in self._r.scan_iter(match=f"{self.prefix}:cand:*", count=1000))

    def put_users(self, contexts):
        with self._r.pipeline(transaction=False) as p:
            for u, c in contexts.items():
                p.set(self._u(u), json.dumps(c, separators=(",", ":"), default=str))
            p.execute()
        return len(contexts)

    def get_users(self, user_ids):
        if not user_ids:
            return {}
        return {u: json.loads(raw) for u, raw in
                zip(user_ids, self._r.mget([self._u(u) for u in user_ids])) if raw is not None}

    def enqueue(self, user_ids, priority=False):
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return 0
        if priority:  # score 0: claimable now, before every ordinary entry (scored by time)
            new = sum(1 for u in ids if self._r.zscore(self._q, u) is None)
            self._r.zadd(self._q, {u: 0.0 for u in ids})
            return new
        now = time.time()
        return int(self._r.zadd(self._q, {u: now for u in ids}, nx=True))

    def claim(self, n, lease_s=60.0):
        now = time.time()
        ids = self._claim(keys=[self._q], args=[now, int(n), now + lease_s])
        return [i.decode() if isinstance(i, bytes) else i for i in ids]

    def ack(self, user_ids):
        ids = list(user_ids)
        return int(self._r.zrem(self._q, *ids)) if ids else 0

    def queue_depth(self):
        return int(self._r.zcard(self._q))

    def users_not_of_model(self, model_version):
        keys = list(self._r.scan_iter(match=f"{self.prefix}:cand:*", count=1000))
        out, start = [], len(f"{self.prefix}:cand:")
        for i in range(0, len(keys), 1000):
            chunk = keys[i:i + 1000]
            for key, raw in zip(chunk, self._r.mget(chunk)):
                if raw is not None and CandidateRecord.from_json(raw).model_version != model_version:
                    out.append((key.decode() if isinstance(key, bytes) else key)[start:])
        return out

    def set_ads_active(self, ad_ids, active):
        ids = list(dict.fromkeys(ad_ids))
        with self._r.pipeline(transaction=True) as p:
            if ids:
                (p.srem if active else p.sadd)(self._off, *ids)
            p.incr(self._off_version)
            return int(p.execute()[-1])

    def inactive_ads(self):
        with self._r.pipeline(transaction=True) as p:
            p.get(self._off_version)
            p.smembers(self._off)
            version, members = p.execute()
        return int(version or 0), {m.decode() if isinstance(m, bytes) else m for m in members}

    def ads_status_version(self):
        return int(self._r.get(self._off_version) or 0)

    def set_meta(self, key, value):
        self._r.set(f"{self.prefix}:meta:{key}", value)

    def get_meta(self, key):
        raw = self._r.get(f"{self.prefix}:meta:{key}")
        return raw.decode() if isinstance(raw, bytes) else raw

    def clear(self):
        keys = list(self._r.scan_iter(match=f"{self.prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            self._r.delete(*keys[i:i + 1000])

    def close(self):
        self._r.close()
