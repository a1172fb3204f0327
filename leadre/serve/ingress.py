"""The HTTP tier: FastAPI through ``serve.ingress``.

``POST /recommend``  {"user_id": "u42", "k": 10, "recent_events": [...]}  ->  ads with scores,
                     the source of each (generated / ann / fallback) and the versions in use.
``GET  /healthz``    200 with the index/S-ID/model versions when the graph answers.
``POST /admin/index`` {"index_dir": "..."} with ``Authorization: Bearer <token>``: swap the
                     matcher's ScaNN index on every replica (and for replicas started later).

Bad input gets a 4xx saying what is wrong (422 field errors, 413 too large, 415 not JSON);
overload gets 503 (``max_queued_requests`` at the proxy, or the matcher not answering within
``request_timeout_s``), never a hang. The request path does not wait for the generator: a
cache miss sends it a fire-and-forget nudge.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class on
# the methods that serve.ingress rewrites.
import asyncio
import hmac
import json
import logging
import re
import time
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from leadre.data.schema import DOMAIN_ACTIONS
from leadre.serve.config import IngressConfig

log = logging.getLogger(__name__)

USER_ID = re.compile(r"^[A-Za-z0-9_.:@\-]{1,128}$")


class RecentEvent(BaseModel):
    """One behaviour the client saw (newest last in the list)."""

    model_config = ConfigDict(extra="forbid")
    domain: Literal["ad", "video", "news"]
    action: Literal["impression", "click", "conversion", "play", "read"]
    ad_id: str | None = Field(default=None, max_length=128)
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
        user_id: str = Field(min_length=1, max_length=128, pattern=USER_ID.pattern)
        k: int = Field(default=k_default, ge=1, le=k_max)
        recent_events: list[RecentEvent] = Field(default_factory=list, max_length=max_events)

    return RecommendRequest


class IndexSwap(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index_dir: str = Field(min_length=1, max_length=4096)


def _errors(e: ValidationError) -> list[dict]:
    return [{"field": ".".join(str(p) for p in err["loc"]) or "body", "error": err["msg"]}
            for err in e.errors(include_url=False)]


def bad_request(status: int, message: str, errors: list | None = None) -> JSONResponse:
    body = {"error": message}
    if errors:
        body["details"] = errors
    return JSONResponse(body, status_code=status)


async def read_json(request: Request, limit: int) -> tuple[object | None, JSONResponse | None]:
    """Body as JSON within ``limit`` bytes, or the 4xx response to send."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                return None, bad_request(413, f"request body is {declared} bytes; the limit is "
                                              f"{limit}")
        except ValueError:
            return None, bad_request(400, "invalid Content-Length header")
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if ctype not in ("application/json", ""):
        return None, bad_request(415, f"Content-Type must be application/json, got {ctype!r}")
    body = bytearray()
    async for chunk in request.stream():  # chunked uploads are capped too
        body += chunk
        if len(body) > limit:
            return None, bad_request(413, f"request body exceeds the limit of {limit} bytes")
    try:
        return json.loads(body), None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, bad_request(400, f"request body is not valid JSON: {e}")


app = FastAPI(title="LEADRE recommendations", version="1.0",
              description="Two-tier LLM ad retrieval: cached LLM candidates + ScaNN matcher.")


def _deployment():
    from ray import serve
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    from ray.serve.metrics import Counter, Histogram

    # Sizes and replica options: IngressConfig, applied with .options() by app.build.
    @serve.deployment(name="Ingress")
    @serve.ingress(app)
    class Ingress:
        def __init__(self, matcher, generator, cfg: IngressConfig):
            """``matcher`` / ``generator``: handles of those tiers. ``cfg.admin_token`` is
            used as given (``app.build`` resolves ``$LEADRE_ADMIN_TOKEN`` on the driver)."""
            self.matcher = matcher
            self.generator = generator
            self.Request = request_model(cfg.k_default, cfg.k_max, cfg.max_recent_events)
            self.limit = cfg.max_body_bytes
            self.timeout = cfg.request_timeout_s
            self.token = cfg.admin_token
            self._nudges: set = set()
            self.latency = Histogram(
                "leadre_tier_latency_ms", description="latency per serving tier (ms)",
                boundaries=[1, 2, 5, 10, 20, 50, 100, 250, 1000, 5000], tag_keys=("tier",))
            self.latency.set_default_tags({"tier": "ingress"})
            self.responses = Counter("leadre_http_responses_total",
                                     description="HTTP answers of /recommend by status",
                                     tag_keys=("status",))
            self.nudge_errors = Counter("leadre_generation_nudge_errors_total",
                                        description="fire-and-forget generator calls that failed")

        def _done(self, status: int, t0: float) -> None:
            self.latency.observe((time.perf_counter() - t0) * 1000)
            self.responses.inc(tags={"status": str(status)})

        def _nudge(self, user_id: str) -> None:
            """Fire-and-forget: the store queue already holds the user, so a failure here
            (generator down, backlogged) only delays generation until a replica drains it."""
            try:
                resp = self.generator.generate.remote(user_id)
            except Exception:
                self.nudge_errors.inc()
                return

            async def wait():
                try:
                    await resp
                except Exception as e:  # noqa: BLE001 - logged and counted, never raised
                    self.nudge_errors.inc()
                    log.debug("generation nudge for %s failed: %r", user_id, e)

            task = asyncio.get_running_loop().create_task(wait())
            self._nudges.add(task)
            task.add_done_callback(self._nudges.discard)

        @app.post("/recommend")
        async def recommend(self, request: Request):
            t0 = time.perf_counter()
            data, err = await read_json(request, self.limit)
            if err is not None:
                self._done(err.status_code, t0)
                return err
            try:
                req = self.Request.model_validate(data)
            except ValidationError as e:
                self._done(422, t0)
                return bad_request(422, "invalid request", _errors(e))
            events = [e.model_dump() for e in req.recent_events]
            resp = self.matcher.recommend.remote(req.user_id, req.k, events)
            try:
                out = await asyncio.wait_for(resp, self.timeout)
            except asyncio.TimeoutError:
                resp.cancel()
                self._done(503, t0)
                return bad_request(503, f"matcher did not answer within {self.timeout}s; "
                                        "retry later")
            except (BackPressureError, DeploymentUnavailableError) as e:
                self._done(503, t0)
                return bad_request(503, f"overloaded: {type(e).__name__}; retry later")
            if out.get("queued"):
                self._nudge(req.user_id)
            self._done(200, t0)
            return out

        @app.get("/healthz")
        async def healthz(self):
            try:
                info = await asyncio.wait_for(self.matcher.info.remote(), self.timeout)
            except Exception as e:  # noqa: BLE001
                return bad_request(503, f"matcher unavailable: {type(e).__name__}")
            return {"status": "ok", **info}

        @app.post("/admin/index")
        async def swap_index(self, request: Request):
            if not self.token:
                return bad_request(403, "admin endpoint disabled: set admin_token or "
                                        "LEADRE_ADMIN_TOKEN")
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            data, err = await read_json(request, self.limit)
            if err is not None:
                return err
            try:
                req = IndexSwap.model_validate(data)
            except ValidationError as e:
                return bad_request(422, "invalid request", _errors(e))
            # Validate and swap on one replica first (and persist it for replicas that start
            # later); only then fan out, so a bad directory touches nothing.
            try:
                first = await self.matcher.swap_index.remote(req.index_dir)
            except Exception as e:  # noqa: BLE001 - the replica keeps its old index
                return bad_request(400, f"index swap rejected: {_cause(e)}")
            results = await self.matcher.broadcast(
                "swap_index", req.index_dir, persist=False).results_async(timeout_s=120)
            return {"status": "swapped", **first, "replicas": len(results)}

    return Ingress


def _cause(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    tail = [line for line in text if line.strip()][-1:] if text else []
    return tail[0][:500] if tail else type(e).__name__


Ingress = _deployment()
