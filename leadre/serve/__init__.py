"""Stage 8: the two-tier Ray Serve graph.

``Ingress`` (FastAPI, HTTP) -> ``Matcher`` (ScaNN + candidate store, latency-sensitive, CPU)
and, asynchronously, ``Generator`` (the fine-tuned LLM, ``@serve.batch``, GPU when present),
which writes generated S-IDs to the candidate store (``leadre.serve.store``).

Entry points: ``leadre serve`` (``run``), ``serve run leadre.serve:build_app`` and the
``serve_configs/*.yaml`` files (``build_app``). ``ServeConfig`` holds one typed section per
tier (``IngressConfig``, ``MatcherConfig``, ``GeneratorConfig``). Ray Serve is imported lazily:
importing this package for its config costs nothing.
"""

from leadre.serve.config import (GeneratorConfig, IngressConfig, MatcherConfig, ServeConfig,
                                 ServePaths)


def build_app(args=None):
    from leadre.serve.app import build_app as _build_app

    return _build_app(args)


def build(cfg: ServeConfig):
    from leadre.serve.app import build as _build

    return _build(cfg)


def run(cfg: ServeConfig) -> dict:
    from leadre.serve.app import run as _run

    return _run(cfg)


__all__ = ["GeneratorConfig", "IngressConfig", "MatcherConfig", "ServeConfig", "ServePaths",
           "build_app", "build", "run"]
