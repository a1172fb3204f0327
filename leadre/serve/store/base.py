"""The candidate store's record, interface and errors, shared by both backends."""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

DEFAULT_URL = "sqlite:///runs/store/candidates.db"
_ADS_VERSION_KEY = "ads_status_version"  # SQLite meta row holding the ad-status version


@dataclass
class CandidateRecord:
    """Generated candidates of one user. ``sids`` are best first, ``scores`` aligned (higher
    is better, e.g. beam log-probabilities). ``expires_at``/``created_at`` are UNIX seconds;
    ``basis_ts`` is the time of the newest event the generator saw (None: unknown), so a
    request carrying newer events can be told apart (fresh intent)."""

    user_id: str
    sids: list[str]
    scores: list[float]
    model_version: str
    sid_version: str
    created_at: float = field(default_factory=time.time)
    expires_at: float = 0.0
    basis_ts: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "CandidateRecord":
        return cls(**json.loads(raw))

    @property
    def basis(self) -> float:
        """Newer events than this are news to these candidates (creation time when the
        generator recorded no event time)."""
        return self.created_at if self.basis_ts is None else self.basis_ts

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
    def enqueue(self, user_ids: Iterable[str], priority: bool = False) -> int:
        """Queue users for generation; returns how many were not queued already.
        ``priority`` puts them before every ordinary entry (and moves them there when they
        are queued already): users served candidates of a replaced model."""

    @abstractmethod
    def claim(self, n: int, lease_s: float = 60.0) -> list[str]:
        """Take up to ``n`` queued users, priority ones first, then oldest first; they become
        claimable again after ``lease_s`` unless acked (a dead worker's claims come back)."""

    @abstractmethod
    def ack(self, user_ids: Iterable[str]) -> int:
        """Remove users from the queue (their generation is done)."""

    @abstractmethod
    def queue_depth(self) -> int: ...

    @abstractmethod
    def users_not_of_model(self, model_version: str) -> list[str]:
        """Users holding unexpired candidates of another model than ``model_version`` (what a
        model rollout has left to regenerate)."""

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
