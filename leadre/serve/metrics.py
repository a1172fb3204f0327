"""The serving tiers' Prometheus metrics (exported through Ray), created in one place so every
tier names and tags them the same way: ``leadre_tier_latency_ms{tier}`` plus counters and
gauges named ``leadre_*``."""

from __future__ import annotations

from typing import Sequence

# Bucket edges of the tier latency histogram: milliseconds for the matcher, seconds for the LLM.
MATCHER_BUCKETS_MS = (0.25, 0.5, 1, 2, 5, 10, 15, 25, 50, 100, 250, 1000)
GENERATOR_BUCKETS_MS = (1, 5, 10, 50, 100, 500, 1000, 5000, 20000)


def tier_latency(tier: str, boundaries: Sequence[float]):
    """``leadre_tier_latency_ms`` with ``tier`` as its default tag."""
    from ray.serve.metrics import Histogram

    h = Histogram("leadre_tier_latency_ms", description="latency per serving tier (ms)",
                  boundaries=list(boundaries), tag_keys=("tier",))
    h.set_default_tags({"tier": tier})
    return h


def counter(name: str, description: str, *tag_keys: str):
    from ray.serve.metrics import Counter

    return Counter(name, description=description, tag_keys=tag_keys or None)


def gauge(name: str, description: str):
    from ray.serve.metrics import Gauge

    return Gauge(name, description=description)


def histogram(name: str, description: str, boundaries: Sequence[float]):
    from ray.serve.metrics import Histogram

    return Histogram(name, description=description, boundaries=list(boundaries))
