"""The admin routes on a port of their own.

With ``matcher.admin_port`` set, ``app.build_admin`` deploys ``Admin``, a one-replica Serve
deployment in an application of its own with no route on Serve's HTTP port. It runs its own
HTTP server (uvicorn, in a thread of the replica) on ``matcher.admin_host:admin_port`` and
serves the admin routes there; the Matcher replicas answer 404 for ``/admin/*`` on the public
port (``matcher._admin_body``):

    public port ──> Matcher replicas (/recommend, /healthz; /admin/* -> 404)
    admin port  ──> Admin (1 replica) ──> candidate store + every Matcher replica (handle)

``POST /admin/ads/new`` has one matcher replica add the ads (S-IDs, a new index version
beside the one in use) and record it, then every replica swaps to the new index and every
generator reloads the S-ID table. ``POST /admin/model`` has one matcher replica check the
model and record the rollout in the store, which every generator replica follows. ``POST /admin/ads`` writes the ad status to the store (every matcher replica polls its version)
and tells every replica at once, as the matcher's own route does; ``POST /admin/index`` has one
matcher replica check and load the directory (index root, no pickle, content hash) and record
the swap in the store, then tells every replica. So the Admin holds no index and works with any
number of matcher replicas; a replica the broadcast misses follows the store within
``watch_interval_s`` / ``ad_status_interval_s``.

The bearer token is resolved at every request, in the replica (``MatcherConfig.token``): a
token file (a mounted Kubernetes Secret) is re-read when it changes, so a rotated Secret
applies without a redeploy.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class.
import asyncio
import errno
import logging
import socket
import threading
import time

from fastapi import FastAPI, Request
from pydantic import ValidationError
from ray import serve

from leadre.serve import api
from leadre.serve.config import MatcherConfig
from leadre.serve.store import open_store

log = logging.getLogger(__name__)

ADMIN_DEPLOYMENT = "Admin"
# Deployment options of the Admin tier (a Serve YAML's `deployments:` entry overrides them).
ADMIN_OPTIONS = {"num_replicas": 1, "max_ongoing_requests": 8, "max_queued_requests": 16,
                 "ray_actor_options": {"num_cpus": 0}}


async def admin_body(request: Request, model, cfg: MatcherConfig):
    """``(request model, None)``, or ``(None, the 4xx to send)``: the bearer token first
    (resolved now, so a rotated token applies at once), then the body within the limits."""
    denied = api.check_token(request, cfg.token())
    if denied is not None:
        return None, denied
    data, err = await api.read_json(request, cfg.max_body_bytes, cfg.max_drain_bytes)
    if err is not None:
        return None, err
    try:
        return model.model_validate(data), None
    except ValidationError as e:
        return None, api.error(422, "invalid request", api.field_errors(e))


async def admin_add_ads(adding, everyone):
    """``POST /admin/ads/new`` on either port: ``adding`` is one Matcher replica's
    :meth:`Matcher.add_ads` (its coroutine on that replica, a handle's response from the
    Admin tier); then
    every replica of ``everyone`` swaps to the new index."""
    try:
        out = await adding
    except Exception as e:  # noqa: BLE001 - nothing was added (the extension rolls back)
        return api.error(400, f"adding ads rejected: {api.cause(e)}")
    if out.get("status") == "refused":
        return api.error(400, out["error"], out["problems"])
    results = await everyone.broadcast("swap_index", out["index_dir"], persist=False
                                       ).results_async(timeout_s=120, return_exceptions=True)
    told = sum(1 for r in results if not isinstance(r, BaseException))
    return {**out, "replicas": told}


def bind_socket(host: str, port: int, wait_s: float = 30.0) -> socket.socket:
    """A listening socket on ``host:port``; a port still held (a replica being replaced on
    the same node) is retried for ``wait_s``, then the error is raised (Serve retries the
    replica)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
            return sock
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise OSError(e.errno, f"admin port {host}:{port}: {e.strerror}") from e
            time.sleep(0.5)


class AdminServer:
    """``app`` served by uvicorn on ``sock`` in a thread with its own event loop (uvicorn
    installs no signal handlers off the main thread, so the replica's own stay)."""

    def __init__(self, app: FastAPI, sock: socket.socket, start_timeout_s: float = 30.0):
        import uvicorn

        self.sock = sock
        self.server = uvicorn.Server(uvicorn.Config(app, loop="asyncio", lifespan="off",
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="leadre-admin-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the admin HTTP server did not start")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout_s)
        self.sock.close()


@serve.deployment(name=ADMIN_DEPLOYMENT)
class Admin:
    """The admin routes on ``cfg.admin_host:cfg.admin_port`` for the Matcher deployment of
    application ``matcher_app``; ``store_url`` is the candidate store they share. Requests
    are read (token, body) on the HTTP server's thread; the work runs on the replica's event
    loop, where Serve handles live."""

    async def __init__(self, cfg: MatcherConfig, store_url: str, matcher_app: str):
        if cfg.admin_port is None:
            raise ValueError("Admin needs matcher.admin_port")
        self.cfg, self.matcher_app = cfg, matcher_app
        self.store = open_store(store_url)
        self._loop = asyncio.get_running_loop()
        self._matcher = None
        self.replica = serve.get_replica_context().replica_id.unique_id
        sock = await asyncio.to_thread(bind_socket, cfg.admin_host, cfg.admin_port)
        self.http = await asyncio.to_thread(AdminServer, self._routes(), sock)
        log.info("admin routes on http://%s:%d (matcher app %r)", cfg.admin_host,
                 cfg.admin_port, matcher_app)

    def _routes(self) -> FastAPI:
        app = FastAPI(title="LEADRE admin", docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/healthz")
        async def healthz():
            return {"status": "ok", "matcher_app": self.matcher_app, "replica": self.replica}

        @app.post("/admin/index")
        async def swap_index(request: Request):
            req, err = await admin_body(request, api.IndexSwap, self.cfg)
            if err is not None:
                return err
            return await self._on_replica_loop(self.swap_index(req.index_dir))

        @app.post("/admin/model")
        async def rollout(request: Request):
            req, err = await admin_body(request, api.ModelRollout, self.cfg)
            if err is not None:
                return err
            return await self._on_replica_loop(self.start_rollout(req.model_dir))

        @app.post("/admin/ads")
        async def ad_status(request: Request):
            req, err = await admin_body(request, api.AdStatusChange, self.cfg)
            if err is not None:
                return err
            return await self._on_replica_loop(self.set_ads_active(req.ad_ids, req.active))

        @app.post("/admin/ads/new")
        async def add_ads(request: Request):
            req, err = await admin_body(request, api.AdsAdd, self.cfg)
            if err is not None:
                return err
            return await self._on_replica_loop(self.add_ads(req.ads))

        return app

    async def add_ads(self, ads: list[dict]):
        """One matcher replica adds the ads (S-IDs, a new index version, the store records
        both); then every replica swaps to the new index."""
        matchers = self._matchers()
        return await admin_add_ads(matchers.add_ads.remote(ads), matchers)

    async def _on_replica_loop(self, coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _matchers(self):
        if self._matcher is None:
            self._matcher = serve.get_deployment_handle("Matcher", self.matcher_app)
        return self._matcher

    async def swap_index(self, index_dir: str):
        """One matcher replica checks, loads and swaps to ``index_dir`` and records it in
        the store (a bad directory touches nothing); then every replica swaps."""
        from ray.exceptions import RayTaskError

        matchers = self._matchers()
        try:
            first = await matchers.swap_index.remote(index_dir)
        except RayTaskError as e:  # the replica refused the directory; it keeps its index
            return api.error(400, f"index swap rejected: {api.cause(e)}")
        except Exception as e:  # noqa: BLE001 - no matcher to ask
            return api.error(503, f"matcher unavailable: {api.cause(e)}")
        results = await matchers.broadcast("swap_index", index_dir, persist=False
                                           ).results_async(timeout_s=120)
        return {"status": "swapped", **first, "replicas": len(results)}

    async def start_rollout(self, model_dir: str):
        """A matcher replica checks ``model_dir`` against the S-IDs it serves and records the
        rollout in the store, which the generators follow."""
        from ray.exceptions import RayTaskError

        try:
            return await self._matchers().start_rollout.remote(model_dir)
        except RayTaskError as e:
            return api.error(400, f"model rollout rejected: {api.cause(e)}")
        except Exception as e:  # noqa: BLE001 - no matcher to ask
            return api.error(503, f"matcher unavailable: {api.cause(e)}")

    async def set_ads_active(self, ad_ids: list[str], active: bool) -> dict:
        """The store records it (replicas poll its version, and those starting later read
        it); every replica is told at once."""
        version = await asyncio.to_thread(self.store.set_ads_active, ad_ids, active)
        matchers = self._matchers()
        results = await matchers.broadcast("apply_ad_status").results_async(
            timeout_s=30, return_exceptions=True)
        told = [r for r in results if not isinstance(r, BaseException)]
        off = None
        try:
            off = (await matchers.info.remote())["ads_switched_off"]
        except Exception as e:  # noqa: BLE001 - the store has it; replicas catch up
            log.warning("admin: matcher info unavailable: %r", e)
        return {"status": "updated", "ad_status_version": version, "ads": len(set(ad_ids)),
                "active": active, "replicas": len(told), "ads_switched_off": off}

    async def check_health(self) -> None:
        if not self.http.alive():
            raise RuntimeError("the admin HTTP server stopped")

    def __del__(self):
        http = getattr(self, "http", None)
        if http is not None:
            http.stop()
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
