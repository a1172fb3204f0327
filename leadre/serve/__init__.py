"""Stage 8: the two-tier Ray Serve graph.

``Matcher`` (latency-sensitive, CPU: the HTTP ingress itself; cached LLM candidates + ScaNN)
and, fire-and-forget, ``Generator`` (latency-tolerant: the fine-tuned LLM, ``@serve.batch``,
GPU when present), which writes generated S-IDs to the candidate store
(``leadre.serve.store``) that the matcher reads.

Entry points: ``leadre serve`` (``run``), ``serve run leadre.serve:build_app`` and the
``serve_configs/*.yaml`` files (``build_app``). ``ServeConfig`` holds one typed section per
tier (``MatcherConfig``, ``GeneratorConfig``). Ray Serve is imported lazily: importing this
package for its config costs nothing.
"""

from leadre.serve.config import GeneratorConfig, MatcherConfig, ServeConfig, ServePaths


def build_app(args=None):
    from leadre.serve.app import build_app as _build_app

    return _build_app(args)


def build(cfg: ServeConfig):
    from leadre.serve.app import build as _build

    return _build(cfg)


def run(cfg: ServeConfig) -> dict:
    from leadre.serve.app import run as _run

    return _run(cfg)


__all__ = ["GeneratorConfig", "MatcherConfig", "ServeConfig", "ServePaths", "build_app",
           "build", "run"]
