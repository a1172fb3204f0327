"""Connecting to Ray the same way on a laptop, in a test and inside `ray job submit`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class RayConfig:
    """How a stage gets a Ray cluster.

    address: ``None`` joins the cluster a job runs on (``RAY_ADDRESS`` set by ``ray job
        submit``) or else starts a private local one; ``"auto"`` / ``"ray://..."`` / ``host:port``
        joins that cluster.
    num_cpus: CPUs of a private local cluster (default: all cores). Ignored when joining.
    object_store_mb: object store of a private local cluster; small by default so a laptop
        keeps its memory.
    """

    address: str | None = None
    num_cpus: int | None = None
    object_store_mb: int = 512


def init_ray(cfg: RayConfig | None = None) -> None:
    """Idempotent ``ray.init`` with settings that work on a 2-core machine."""
    import ray  # here, not at the top: configs import this module and must not need Ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # address="local": a stale cluster-address file from a stopped cluster must not make a
    # bare ray.init() retry forever (STACK-NOTES).
    ray.init(
        address="local",
        num_cpus=cfg.num_cpus or os.cpu_count(),
        object_store_memory=cfg.object_store_mb * 1024 * 1024,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        configure_logging=True,
        logging_level=logging.WARNING,
    )
