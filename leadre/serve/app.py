"""Assembling the graph: ``build_app(args)`` is the ``import_path`` target of
``serve run`` / ``serve deploy`` (``leadre.serve:build_app``), ``run(cfg)`` is ``leadre serve``.

    Ingress(matcher, generator, cfg.ingress) ──> Matcher(cfg.matcher, paths)
                         └──async──────────────> Generator(cfg.generator, paths)

Each tier is a deployment whose constructor takes the handles of the tiers it calls and its
typed config section; its deployment options come from that section (``.options(...)``), so
any tier also runs alone: ``serve.run(tier(Matcher, cfg.matcher).bind(cfg.matcher, paths))``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict
from typing import Any

from leadre.config import ConfigError, from_dict, merge
from leadre.serve.config import DeploymentConfig, ServeConfig

log = logging.getLogger(__name__)

# Builder args kept as given: `serve run ... store_url=...` passes strings, and a path must
# not turn into a number or a boolean on the way.
_VERBATIM_ARGS = ("index_dir", "sids_dir", "model_dir", "store_url", "ingress.admin_token")


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
    from leadre.serve.ingress import Ingress
    from leadre.serve.matcher import Matcher

    options = options or {}
    paths = cfg.paths()
    # The token is resolved where the graph is built, like the paths.
    ingress_cfg = dataclasses.replace(cfg.ingress, admin_token=cfg.ingress.token())
    matcher = tier(Matcher, cfg.matcher, options.get("Matcher")).bind(cfg.matcher, paths)
    generator = tier(Generator, cfg.generator, options.get("Generator")).bind(cfg.generator,
                                                                             paths)
    return tier(Ingress, ingress_cfg, options.get("Ingress")).bind(matcher, generator,
                                                                  ingress_cfg)


def build_app(args: dict[str, Any] | None = None):
    """Builder for ``serve run leadre.serve:build_app key=value ...`` and for the ``args:``
    of an application in a Serve config YAML. Keys are ``ServeConfig`` fields, a tier's
    with a dot (``generator.ttl_s=600``) or as a nested mapping in YAML; values from the CLI
    arrive as strings and are parsed as YAML scalars."""
    import yaml

    data: dict[str, Any] = {}
    for key, value in (args or {}).items():
        if isinstance(value, str) and key not in _VERBATIM_ARGS:
            value = yaml.safe_load(value)
        *parents, leaf = key.split(".")
        for p in reversed(parents):
            value = {leaf: value}
            leaf = p
        data = merge(data, {leaf: value})
    return build(from_dict(ServeConfig, data))


def run(cfg: ServeConfig) -> dict:
    """``leadre serve``: start Serve on ``cfg.host:cfg.port`` and deploy the graph."""
    from ray import serve

    from leadre.artifacts import exists
    from leadre.runtime import init_ray

    for path, what in ((cfg.index_dir, "index_dir (run `leadre index`)"),
                       (cfg.sids_dir, "sids_dir (run `leadre sids`)")):
        if not exists(path):
            raise ConfigError(f"{what}: {path} does not exist")
    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    t0 = time.time()
    serve.run(build(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
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
            serve.shutdown()
    return {"stage": "serve", "config": asdict(cfg), "summary": summary}
