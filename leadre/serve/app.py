"""Assembling the graph: ``build_app(args)`` is the ``import_path`` target of
``serve run`` / ``serve deploy`` (``leadre.serve:build_app``), ``run(cfg)`` is ``leadre serve``.

    Ingress(matcher, generator) ──> Matcher(index_dir, sids_dir, store_url)
                   └──async──────> Generator(sids_dir, store_url, model_dir)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from leadre.config import ConfigError, from_dict
from leadre.serve.config import ServeConfig

log = logging.getLogger(__name__)


def _gpus(cfg: ServeConfig) -> float:
    if cfg.generator_gpus is not None:
        return cfg.generator_gpus
    try:
        import ray

        return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    except Exception:  # noqa: BLE001
        return 0.0


def build(cfg: ServeConfig, options: dict[str, dict] | None = None):
    """The bound application for ``cfg`` (paths made absolute here, on the driver).
    ``options`` overrides deployment options per deployment name, e.g.
    ``{"Matcher": {"autoscaling_config": {...}, "num_replicas": "auto"}}``."""
    options = options or {}

    def opts(name: str, base: dict) -> dict:
        extra = dict(options.get(name, {}))
        if "autoscaling_config" in extra:
            base.pop("num_replicas", None)
        return {**base, **extra}

    from leadre.serve.generator import Generator
    from leadre.serve.ingress import Ingress
    from leadre.serve.matcher import Matcher

    cfg = cfg.absolute()
    matcher = Matcher.options(**opts("Matcher", dict(
        num_replicas=cfg.matcher_replicas, ray_actor_options={"num_cpus": cfg.replica_cpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests))).bind(cfg.index_dir, cfg.sids_dir, cfg.store_url, cfg.history_events)
    generator = Generator.options(**opts("Generator", dict(
        num_replicas=cfg.generator_replicas,
        ray_actor_options={"num_cpus": cfg.generator_cpus, "num_gpus": _gpus(cfg)}))).bind(cfg.sids_dir, cfg.store_url, cfg.model_dir, cfg.index_dir, cfg.ttl_s, cfg.top_k,
           cfg.beam_size, cfg.batch_size, cfg.batch_wait_s, cfg.poll_interval_s, cfg.lease_s)
    return Ingress.options(**opts("Ingress", dict(
        num_replicas=cfg.ingress_replicas, ray_actor_options={"num_cpus": cfg.replica_cpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests))).bind(matcher, generator, cfg.k_default, cfg.k_max, cfg.max_recent_events,
           cfg.max_body_bytes, cfg.request_timeout_s, cfg.token())


def build_app(args: dict[str, Any] | None = None):
    """Builder for ``serve run leadre.serve:build_app key=value ...`` and for the ``args:``
    of an application in a Serve config YAML. Keys are ``ServeConfig`` fields; values from
    the CLI arrive as strings and are parsed as YAML scalars."""
    import yaml

    args = dict(args or {})
    parsed = {k: (yaml.safe_load(v) if isinstance(v, str) and k not in
                  ("index_dir", "sids_dir", "model_dir", "store_url", "admin_token") else v)
              for k, v in args.items()}
    return build(from_dict(ServeConfig, parsed))


def run(cfg: ServeConfig) -> dict:
    """``leadre serve``: start Serve on ``cfg.host:cfg.port`` and deploy the graph."""
    from ray import serve

    from leadre.runtime import init_ray

    for path, what in ((cfg.index_dir, "index_dir (run `leadre index`)"),
                       (cfg.sids_dir, "sids_dir (run `leadre sids`)")):
        from leadre.artifacts import exists

        if not exists(path):
            raise ConfigError(f"{what}: {path} does not exist")
    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    t0 = time.time()
    serve.run(build(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    summary = {"url": url, "recommend": f"{url}/recommend", "healthz": f"{url}/healthz",
               "ready_s": round(time.time() - t0, 1), "store_url": cfg.absolute().store_url,
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
