"""Assembling the graph: ``build_app(args)`` is the ``import_path`` target of
``serve run`` / ``serve deploy`` (``leadre.serve:build_app``), ``run(cfg)`` is ``leadre serve``.

    HTTP ──> Matcher(cfg.matcher, paths, generator)    latency-sensitive, the ingress
                 └──fire-and-forget──> Generator(cfg.generator, paths)   latency-tolerant

Each tier is a deployment whose constructor takes its typed config section, the paths and the
handles of the tiers it calls; its deployment options come from that section
(``.options(...)``), so any tier also runs alone:
``serve.run(tier(Matcher, cfg.matcher).bind(cfg.matcher, paths))``.

With ``matcher.admin_port`` set, the admin routes leave the public port for a second
application, ``build_admin(cfg)`` (``leadre.serve.app:build_admin_app`` in a Serve YAML): one
``Admin`` replica with its own HTTP server on that port (:mod:`leadre.serve.admin`).

The admin token is never resolved here: replicas read it themselves at each admin request
(``MatcherConfig.token``: a token file re-read when it changes, or their environment), so it
is not in any deployment's init arguments and rotates without a redeploy.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import asdict
from typing import Any

from leadre.config import ConfigError, from_dict, nest
from leadre.serve.config import DeploymentConfig, ServeConfig

log = logging.getLogger(__name__)

# Builder args kept as given: `serve run ... store_url=...` passes strings, and a path must
# not turn into a number or a boolean on the way.
_VERBATIM_ARGS = ("index_dir", "index_root", "sids_dir", "model_dir", "store_url",
                  "matcher.admin_token", "matcher.admin_token_file", "matcher.admin_host")

# Ray Serve's own high-throughput mode (documented for KubeRay as "Enable High Throughput on
# Ray Serve"): HAProxy instead of the Python proxy, each ingress replica answering HTTP on its
# own port, gRPC between deployments, user code on the replica's event loop. Read by every
# Ray process at start-up, so it is the cluster's environment, not a deployment option.
# Of ``shutdown_timeout_s``: what stopping a local cluster's processes takes on 2 cores.
SHUTDOWN_RESERVE_S = 10.0

HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def tier(deployment, cfg: DeploymentConfig, overrides: dict[str, Any] | None = None):
    """``deployment`` with the options of its config section, then ``overrides`` (Ray Serve
    option names, as in a Serve config's ``deployments:`` entry) on top."""
    opts = cfg.deployment_options()
    extra = dict(overrides or {})
    if "autoscaling_config" in extra:
        opts.pop("num_replicas", None)
    elif "num_replicas" in extra:
        opts.pop("autoscaling_config", None)
    return deployment.options(**{**opts, **extra})


def build(cfg: ServeConfig, options: dict[str, dict] | None = None):
    """The bound application for ``cfg`` (paths made absolute here, on the driver).
    ``options`` overrides deployment options per deployment name, e.g.
    ``{"Matcher": {"autoscaling_config": {...}}}``."""
    from leadre.serve.generator import Generator
    from leadre.serve.matcher import Matcher

    options = options or {}
    paths = cfg.paths()
    # No admin token resolved here: the replicas resolve it themselves (cfg.matcher.token()).
    generator = tier(Generator, cfg.generator, options.get("Generator")).bind(cfg.generator,
                                                                             paths)
    return tier(Matcher, cfg.matcher, options.get("Matcher")).bind(cfg.matcher, paths,
                                                                  generator)


def admin_app_name(cfg: ServeConfig) -> str:
    """Name of the Admin application that ``leadre serve`` deploys beside ``cfg.app_name``."""
    return f"{cfg.app_name}-admin"


def build_admin(cfg: ServeConfig, options: dict[str, dict] | None = None):
    """The Admin application (``matcher.admin_port`` must be set): one replica serving the
    admin routes on ``matcher.admin_host:admin_port`` for the Matcher of application
    ``cfg.app_name``; deploy it with ``route_prefix=None`` (nothing on Serve's HTTP port).
    ``options`` overrides its deployment options (``{"Admin": {...}}``)."""
    from leadre.serve.admin import ADMIN_DEPLOYMENT, ADMIN_OPTIONS, Admin

    if cfg.matcher.admin_port is None:
        raise ConfigError("the Admin application needs matcher.admin_port")
    opts = {**ADMIN_OPTIONS, **((options or {}).get(ADMIN_DEPLOYMENT) or {})}
    return Admin.options(**opts).bind(cfg.matcher, cfg.paths().store_url, cfg.app_name)


def _config(args: dict[str, Any] | None) -> ServeConfig:
    import yaml

    data = nest({key: yaml.safe_load(value) if isinstance(value, str)
                 and key not in _VERBATIM_ARGS else value for key, value in (args or {}).items()})
    return from_dict(ServeConfig, data)


def build_app(args: dict[str, Any] | None = None):
    """Builder for ``serve run leadre.serve:build_app key=value ...`` and for the ``args:``
    of an application in a Serve config YAML. Keys are ``ServeConfig`` fields, a tier's
    with a dot (``generator.ttl_s=600``) or as a nested mapping in YAML; values from the CLI
    arrive as strings and are parsed as YAML scalars."""
    cfg = _config(args)
    cfg.paths().check()
    return build(cfg)


def build_admin_app(args: dict[str, Any] | None = None):
    """Builder of the Admin application in a Serve config YAML
    (``import_path: leadre.serve.app:build_admin_app``, ``route_prefix: null``): the same
    ``ServeConfig`` args as the main application's, of which it reads ``store_url``,
    ``app_name`` (the main application's name, default ``leadre``) and the ``matcher``
    section's ``admin_*`` options."""
    return build_admin(_config(args))


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Until ``url`` answers 200: ``serve.run`` returns when the replicas are up, but the
    HTTP front (Serve's proxy, or HAProxy reloading its routes) may need a moment more."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s:.0f}s")
        time.sleep(0.25)


def _wait_for_stop() -> int:
    """Block until SIGINT (Ctrl-C) or SIGTERM (systemd, Kubernetes) arrives; returns it.
    Both take the same graceful path: Serve stops taking requests, the replicas finish the
    ones in flight, then the command exits 0."""
    got: list[int] = []
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        got.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(3600):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return got[0]


def _within(fn, what: str, deadline: float) -> None:
    """``fn()`` in a thread, waited for until ``deadline`` (monotonic); past it, go on."""
    done = threading.Thread(target=fn, daemon=True)
    done.start()
    done.join(max(0.0, deadline - time.monotonic()))
    if done.is_alive():
        log.warning("%s still running at the shutdown deadline: exiting anyway", what)


def _shutdown(serve, app_name: str, own_cluster: bool, timeout_s: float) -> None:
    """Stop within ``timeout_s``: delete the application (its replicas finish the requests in
    flight: Serve's graceful replica shutdown), then stop the local cluster this command
    started (on a cluster it joined, everything else keeps running). Not
    ``serve.shutdown()``: its controller has been seen to need more than 30 s on an idle
    2-core machine ("Controller failed to shut down within 30.0s")."""
    import ray

    deadline = time.monotonic() + timeout_s
    print("stopping: finishing the requests in flight ...", flush=True)
    # The last few seconds are the local cluster's: its processes take that long to stop.
    drained_by = deadline - (SHUTDOWN_RESERVE_S if own_cluster else 0.0)
    threading.Thread(target=serve.delete, args=(app_name,), daemon=True).start()
    # In high-throughput mode the deletion itself waits on Serve's HAProxy well after every
    # replica has finished and stopped: what counts here is that none is left running.
    while time.monotonic() < drained_by and _replicas_left(serve, app_name):
        time.sleep(0.25)
    if _replicas_left(serve, app_name):
        log.warning("replicas still stopping at the shutdown deadline: exiting anyway")
    if own_cluster:
        _within(ray.shutdown, "ray.shutdown", deadline)


def _replicas_left(serve, app_name: str) -> int:
    """Replicas of ``app_name`` not stopped yet (0 once the application is gone)."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - a controller going away has nothing left to drain
        return 0
    if app is None:
        return 0
    return sum(n for d in app.deployments.values() for state, n in d.replica_states.items()
               if state != "STOPPED")


def run(cfg: ServeConfig) -> dict:
    """``leadre serve``: start Serve on ``cfg.host:cfg.port`` and deploy the graph. When
    this starts its own Ray cluster and ``cfg.high_throughput`` is set, the cluster runs in
    Serve's high-throughput mode (:data:`HIGH_THROUGHPUT_ENV`)."""
    import ray

    from leadre.runtime import init_ray

    cfg.paths().check()  # here, not in a replica that Serve would restart over and over
    own_cluster = not ray.is_initialized() and not (cfg.ray.address or
                                                    os.environ.get("RAY_ADDRESS"))
    if own_cluster and cfg.high_throughput:
        os.environ.update(HIGH_THROUGHPUT_ENV)
    init_ray(cfg.ray)
    from ray import serve  # after the environment: Serve reads it when first imported

    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    t0 = time.time()
    serve.run(build(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    wait_ready(f"{url}/healthz")
    admin = None
    if cfg.matcher.admin_port is not None:
        serve.run(build_admin(cfg), name=admin_app_name(cfg), route_prefix=None)
        host = cfg.matcher.admin_host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        admin = f"http://{host}:{cfg.matcher.admin_port}"
        wait_ready(f"{admin}/healthz")
    summary = {"url": url, "recommend": f"{url}/recommend", "healthz": f"{url}/healthz",
               "admin": f"{admin or url}/admin",
               "ready_s": round(time.time() - t0, 1), "store_url": cfg.paths().store_url,
               "generator": "llm" if cfg.model_dir else "embedding-baseline"}
    log.info("serving at %s", url)
    if cfg.blocking:
        print(f"LEADRE serving at {url}/recommend (Ctrl-C or SIGTERM to stop)", flush=True)
        signum = _wait_for_stop()
        log.info("serve: %s received, draining", signal.Signals(signum).name)
        _shutdown(serve, cfg.app_name, own_cluster, cfg.shutdown_timeout_s)
    return {"stage": "serve", "config": asdict(cfg), "summary": summary}
