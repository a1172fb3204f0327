"""Assembling the graph: ``build_app(args)`` is the ``import_path`` target of
``serve run`` / ``serve deploy`` (``leadre.serve:build_app``), ``run(cfg)`` is ``leadre serve``.

    HTTP ──> Matcher(cfg.matcher, paths, generator)    latency-sensitive, the ingress
                 └──fire-and-forget──> Generator(cfg.generator, paths)   latency-tolerant

Each tier is a deployment whose constructor takes its typed config section, the paths and the
handles of the tiers it calls; its deployment options come from that section
(``.options(...)``), so any tier also runs alone:
``serve.run(tier(Matcher, cfg.matcher).bind(cfg.matcher, paths))``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import asdict
from typing import Any

from leadre.config import from_dict, nest
from leadre.serve.config import DeploymentConfig, ServeConfig

log = logging.getLogger(__name__)

# Builder args kept as given: `serve run ... store_url=...` passes strings, and a path must
# not turn into a number or a boolean on the way.
_VERBATIM_ARGS = ("index_dir", "index_root", "sids_dir", "model_dir", "store_url",
                  "matcher.admin_token")

# Ray Serve's own high-throughput mode (documented for KubeRay as "Enable High Throughput on
# Ray Serve"): HAProxy instead of the Python proxy, each ingress replica answering HTTP on its
# own port, gRPC between deployments, user code on the replica's event loop. Read by every
# Ray process at start-up, so it is the cluster's environment, not a deployment option.
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
    # The token is resolved where the graph is built, like the paths.
    matcher_cfg = dataclasses.replace(cfg.matcher, admin_token=cfg.matcher.token())
    generator = tier(Generator, cfg.generator, options.get("Generator")).bind(cfg.generator,
                                                                             paths)
    return tier(Matcher, matcher_cfg, options.get("Matcher")).bind(matcher_cfg, paths,
                                                                  generator)


def build_app(args: dict[str, Any] | None = None):
    """Builder for ``serve run leadre.serve:build_app key=value ...`` and for the ``args:``
    of an application in a Serve config YAML. Keys are ``ServeConfig`` fields, a tier's
    with a dot (``generator.ttl_s=600``) or as a nested mapping in YAML; values from the CLI
    arrive as strings and are parsed as YAML scalars."""
    import yaml

    data = nest({key: yaml.safe_load(value) if isinstance(value, str)
                 and key not in _VERBATIM_ARGS else value for key, value in (args or {}).items()})
    cfg = from_dict(ServeConfig, data)
    cfg.paths().check()
    return build(cfg)


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


def _shutdown(serve, timeout_s: float) -> None:
    """``serve.shutdown()``, given at most ``timeout_s``: its controller has been seen to need
    more than 30 s (Serve then logs "Controller failed to shut down within 30.0s"), longer than
    a user waits after Ctrl-C. The command returns anyway; a local cluster it started ends with
    the process."""
    import threading

    print("stopping Serve ...", flush=True)
    done = threading.Thread(target=serve.shutdown, daemon=True)
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        log.warning("serve.shutdown() still running after %.0f s: exiting anyway", timeout_s)


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
    summary = {"url": url, "recommend": f"{url}/recommend", "healthz": f"{url}/healthz",
               "ready_s": round(time.time() - t0, 1), "store_url": cfg.paths().store_url,
               "generator": "llm" if cfg.model_dir else "embedding-baseline"}
    log.info("serving at %s", url)
    if cfg.blocking:
        print(f"LEADRE serving at {url}/recommend (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            _shutdown(serve, cfg.shutdown_timeout_s)
    return {"stage": "serve", "config": asdict(cfg), "summary": summary}
