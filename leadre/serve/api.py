"""The HTTP API's request models, body reading and error answers (the routes themselves are on
the Matcher deployment, :mod:`leadre.serve.matcher`).

``POST /recommend``   {"user_id": "u42", "k": 10, "recent_events": [...]}
``GET  /healthz``     index / S-ID / model versions
``POST /admin/index`` {"index_dir": "..."}                    (bearer token)
``POST /admin/ads``   {"ad_ids": ["ad1", ...], "active": false}  (bearer token)

Bad input gets a 4xx saying what is wrong: 400 not JSON, 413 too large, 415 not
``application/json``, 422 field errors (listed in ``details``).
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class.
import hmac
import json
from typing import Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The id rule is ingest's (leadre.data.schema owns it): an id ingest keeps, serving accepts.
from leadre.data.schema import DOMAIN_ACTIONS, ID_MAX_CHARS, ID_PATTERN


class RecentEvent(BaseModel):
    """One behaviour the client saw (newest last in the list)."""

    model_config = ConfigDict(extra="forbid")
    domain: Literal["ad", "video", "news"]
    action: Literal["impression", "click", "conversion", "play", "read"]
    ad_id: str | None = Field(default=None, max_length=ID_MAX_CHARS)
    title: str | None = Field(default=None, max_length=512)
    ts: float | None = Field(default=None, description="UNIX seconds (optional)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.action not in DOMAIN_ACTIONS[self.domain]:
            raise ValueError(f"action {self.action!r} is not valid for domain {self.domain!r} "
                             f"(valid: {sorted(DOMAIN_ACTIONS[self.domain])})")
        if self.domain == "ad" and not self.ad_id:
            raise ValueError("ad events need an ad_id")
        if self.domain != "ad" and not self.title:
            raise ValueError(f"{self.domain} events need a title")
        return self


def request_model(k_default: int, k_max: int, max_events: int) -> type[BaseModel]:
    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user_id: str = Field(min_length=1, max_length=ID_MAX_CHARS, pattern=f"^{ID_PATTERN}$")
        k: int = Field(default=k_default, ge=1, le=k_max)
        recent_events: list[RecentEvent] = Field(default_factory=list, max_length=max_events)

    return RecommendRequest


class IndexSwap(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index_dir: str = Field(min_length=1, max_length=4096)


class ModelRollout(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_dir: str = Field(min_length=1, max_length=4096)


class AdStatusChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ad_ids: list[str] = Field(min_length=1, max_length=100_000)
    active: bool


class AdsAdd(BaseModel):
    """``POST /admin/ads/new``: ads new to the catalog, one object per ad with the ingest
    ``ads`` columns (ad_id, title, category required; description, advertiser, ecpm, active).
    The ads themselves are checked by :func:`leadre.sids.extend.check_new_ads`, which names
    each unusable ad and its reason."""
    model_config = ConfigDict(extra="forbid")
    ads: list[dict] = Field(min_length=1, max_length=10_000)


def field_errors(e: ValidationError) -> list[dict]:
    return [{"field": ".".join(str(p) for p in err["loc"]) or "body", "error": err["msg"]}
            for err in e.errors(include_url=False)]


def error(status: int, message: str, details: list | None = None) -> JSONResponse:
    body = {"error": message}
    if details:
        body["details"] = details
    return JSONResponse(body, status_code=status)


def json_response(obj: dict) -> Response:
    """Serialised once with the standard library (FastAPI's encoder walks the whole answer
    first and costs several times as much)."""
    return Response(json.dumps(obj, separators=(",", ":")).encode(),
                    media_type="application/json")


async def _drain(chunks, already: int, cap: int) -> bool:
    """Read and discard the rest of an over-limit body (up to ``cap`` bytes in all): a server
    that answers before the upload ends and closes leaves the client a connection reset
    instead of the 413. False when the body is larger still (the connection gets closed)."""
    seen = already
    async for chunk in chunks:
        seen += len(chunk)
        if seen > cap:
            return False
    return True


def _too_large(message: str, drained: bool) -> JSONResponse:
    resp = error(413, message)
    if not drained:
        resp.headers["connection"] = "close"
    return resp


async def read_json(request: Request, limit: int,
                    drain_cap: int) -> tuple[object | None, JSONResponse | None]:
    """Body as JSON within ``limit`` bytes, or the 4xx response to send."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            return None, error(400, "invalid Content-Length header")
        if size > limit:
            drained = size <= drain_cap and await _drain(request.stream(), 0, drain_cap)
            return None, _too_large(f"request body is {declared} bytes; the limit is {limit}",
                                    drained)
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if ctype not in ("application/json", ""):
        return None, error(415, f"Content-Type must be application/json, got {ctype!r}")
    body = bytearray()
    chunks = request.stream()
    async for chunk in chunks:  # chunked uploads are capped too
        body += chunk
        if len(body) > limit:
            drained = await _drain(chunks, len(body), drain_cap)
            return None, _too_large(f"request body exceeds the limit of {limit} bytes", drained)
    try:
        return json.loads(body), None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, error(400, f"request body is not valid JSON: {e}")


def check_token(request: Request, token: str | None) -> JSONResponse | None:
    """None when the bearer token matches; else the 403 (no token configured) / 401."""
    if not token:
        return error(403, "admin endpoints disabled: set admin_token or LEADRE_ADMIN_TOKEN")
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
    return None


def cause(e: BaseException) -> str:
    """The last line of an exception's text (a remote traceback ends with the message)."""
    text = str(e).strip().splitlines()
    tail = [line for line in text if line.strip()][-1:] if text else []
    return tail[0][:500] if tail else type(e).__name__
