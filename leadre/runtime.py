"""Connecting to Ray the same way on a laptop, in a test and inside `ray job submit`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Ray Train's print patch sends every print() of a training worker to the logger *and*, when
# sys.stdout is not the process's own stream, to the original print as well: each progress
# line appears twice, and dill's function hashing (run by HF datasets' fingerprinting), which
# disassembles bytecode into a captured sys.stdout, leaks page after page of bytecode into the
# log. Ray Train copies this variable from the driver to its workers.
TRAIN_PRINT_PATCH = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}

# What `quiet` sets in the driver and, through the job's runtime_env, in every worker:
# progress bars and advisory logs of the HF libraries, which only make sense on a terminal.
QUIET_ENV = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
             "DATASETS_VERBOSITY": "error", "TQDM_DISABLE": "1"}


@dataclass
class RayConfig:
    """How a stage gets a Ray cluster.

    address: ``None`` joins the cluster a job runs on (``RAY_ADDRESS`` set by ``ray job
        submit``) or else starts a private local one; ``"auto"`` / ``"ray://..."`` / ``host:port``
        joins that cluster.
    num_cpus: CPUs of a private local cluster (default: all cores). Ignored when joining.
    object_store_mb: object store of a private local cluster; small by default so a laptop
        keeps its memory.
    quiet: the workers' output stays in the Ray session's log files instead of also being
        printed by the driver (``log_to_driver``), Ray Data shows no progress and logs only
        warnings on the console (its full log stays in the session's ``ray-data`` folder), and
        the HF libraries' progress bars and advisory messages are off. Unset (``None``), a
        stage run from the ``leadre`` command is quiet unless ``--verbose`` is given (the
        command also keeps the libraries' output in a log file), and a library caller's
        ``init_ray`` is not.
    """

    address: str | None = None
    num_cpus: int | None = None
    object_store_mb: int = 512
    quiet: bool | None = field(default=None, metadata={
        "help": "keep worker output, progress bars and Ray Data's progress in log files "
                "(unset: on unless --verbose)"})


def init_ray(cfg: RayConfig | None = None) -> None:
    """Idempotent ``ray.init`` with settings that work on a 2-core machine."""
    import ray  # here, not at the top: configs import this module and must not need Ray

    cfg = cfg or RayConfig()
    for k, v in TRAIN_PRINT_PATCH.items():
        os.environ.setdefault(k, v)
    if cfg.quiet:
        for k, v in QUIET_ENV.items():
            os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": dict(QUIET_ENV)} if cfg.quiet else None
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=not cfg.quiet, runtime_env=runtime_env)
    else:
        # address="local": a stale cluster-address file from a stopped cluster must not make
        # a bare ray.init() retry forever.
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus or os.cpu_count(),
            object_store_memory=cfg.object_store_mb * 1024 * 1024,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            configure_logging=True,
            logging_level=logging.WARNING,
            log_to_driver=not cfg.quiet,
            runtime_env=runtime_env,
        )
    if cfg.quiet:
        quiet_ray_data()


def quiet_ray_data() -> None:
    """Ray Data in this process: no progress bars or per-dataset progress logs on the
    console; warnings still show, the full log is in the session's ``logs/ray-data``."""
    import ray.data
    from ray._private.log import PlainRayHandler

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, PlainRayHandler):
            handler.setLevel(logging.WARNING)
