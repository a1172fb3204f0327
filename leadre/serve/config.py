"""``ServeConfig``: every knob of stage 8, the two-tier Ray Serve graph."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from leadre.config import ConfigError
from leadre.runtime import RayConfig


@dataclass
class ServeConfig:
    """Configuration of ``leadre serve`` and of ``leadre.serve:build_app`` (the ``args:`` of a
    ``serve_configs/*.yaml`` application).

    Parameters:
        index_dir: output of ``leadre index`` (ScaNN over active ads).
        sids_dir: output of ``leadre sids`` (S-ID table, embeddings, text encoder).
        model_dir: output of ``leadre sft`` / ``leadre dpo``; ``None`` runs the generator with
            the embedding baseline (history -> nearest ads) so the graph works before training.
        store_url: candidate store, ``sqlite:///path.db`` (embedded) or ``redis://host:port/0``.
        admin_token: bearer token of ``POST /admin/index``; ``None`` reads
            ``$LEADRE_ADMIN_TOKEN``; with neither, the admin endpoint answers 403.
        ttl_s: lifetime of generated candidates in the store.
    Deployment sizes here are defaults for ``leadre serve``; a Serve config YAML overrides
    them per deployment (``deployments:`` section), autoscaling included.
    """

    index_dir: str = field(default="runs/index", metadata={"help": "output of `leadre index`"})
    sids_dir: str = field(default="runs/sids", metadata={"help": "output of `leadre sids`"})
    model_dir: str | None = field(default=None, metadata={
        "help": "output of `leadre sft`/`leadre dpo`; unset: embedding-baseline generator"})
    store_url: str = field(default="sqlite:///runs/store/candidates.db", metadata={
        "help": "candidate store: sqlite:///path.db (embedded) or redis://host:port/0"})
    admin_token: str | None = field(default=None, metadata={
        "help": "bearer token for POST /admin/index (default: $LEADRE_ADMIN_TOKEN)"})
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP host (leadre serve)"})
    port: int = field(default=8000, metadata={"help": "HTTP port (leadre serve)"})
    app_name: str = field(default="leadre", metadata={"help": "Serve application name"})
    route_prefix: str = field(default="/", metadata={"help": "HTTP route prefix"})

    # --- request handling -------------------------------------------------------------
    k_default: int = field(default=10, metadata={"help": "ads per answer when k is absent"})
    k_max: int = field(default=100, metadata={"help": "largest k a request may ask for"})
    max_recent_events: int = field(default=50, metadata={
        "help": "most recent_events a request may carry"})
    max_body_bytes: int = field(default=65_536, metadata={
        "help": "request bodies above this size get 413"})
    request_timeout_s: float = field(default=2.0, metadata={
        "help": "the ingress answers 503 when the matcher takes longer than this"})
    history_events: int = field(default=20, metadata={
        "help": "events (request + stored history) that build a real-time ANN query"})

    # --- generator ----------------------------------------------------------------------
    ttl_s: float = field(default=86_400.0, metadata={"help": "lifetime of generated candidates"})
    top_k: int = field(default=20, metadata={"help": "candidates generated per user"})
    beam_size: int = field(default=20, metadata={"help": "beams per user (>= top_k)"})
    batch_size: int = field(default=16, metadata={"help": "@serve.batch max_batch_size"})
    batch_wait_s: float = field(default=0.05, metadata={"help": "@serve.batch wait timeout"})
    poll_interval_s: float = field(default=0.5, metadata={
        "help": "how often an idle generator replica looks at the store's queue"})
    lease_s: float = field(default=120.0, metadata={
        "help": "a claimed queue entry returns to the queue after this (dead replica)"})

    # --- deployments (defaults for `leadre serve`; YAML configs override) ---------------
    ingress_replicas: int = field(default=1, metadata={"help": "ingress replicas"})
    matcher_replicas: int = field(default=1, metadata={"help": "matcher replicas"})
    generator_replicas: int = field(default=1, metadata={"help": "generator replicas"})
    replica_cpus: float = field(default=0.1, metadata={
        "help": "CPUs reserved per ingress/matcher replica"})
    generator_cpus: float = field(default=0.1, metadata={"help": "CPUs per generator replica"})
    generator_gpus: float | None = field(default=None, metadata={
        "help": "GPUs per generator replica; unset: 1 when the cluster has GPUs, else 0"})
    max_ongoing_requests: int = field(default=32, metadata={
        "help": "requests in flight per ingress/matcher replica"})
    max_queued_requests: int = field(default=64, metadata={
        "help": "requests queued per caller before 503 (overload shedding)"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "how to reach Ray"})
    blocking: bool = field(default=True, metadata={
        "help": "leadre serve: keep running until Ctrl-C (false: deploy and return)"})

    def __post_init__(self) -> None:
        if not 1 <= self.k_default <= self.k_max:
            raise ConfigError(f"need 1 <= k_default <= k_max, got {self.k_default}, {self.k_max}")
        if self.top_k > self.beam_size:
            raise ConfigError(f"top_k={self.top_k} > beam_size={self.beam_size}")
        if self.ttl_s <= 0 or self.request_timeout_s <= 0:
            raise ConfigError("ttl_s and request_timeout_s must be > 0")
        if self.max_body_bytes < 256:
            raise ConfigError("max_body_bytes must be >= 256")
        if self.max_ongoing_requests < 1:
            raise ConfigError("max_ongoing_requests must be >= 1")

    def token(self) -> str | None:
        return self.admin_token or os.environ.get("LEADRE_ADMIN_TOKEN") or None

    def absolute(self) -> "ServeConfig":
        """Paths made absolute on the driver: replicas may run with another working dir."""
        import dataclasses

        def fix(p: str | None) -> str | None:
            return p if p is None or "://" in p else str(Path(p).expanduser().resolve())

        url = self.store_url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            url = "sqlite:///" + str(Path(url[len("sqlite:///"):]).resolve())
        elif "://" not in url:
            url = "sqlite:///" + str(Path(url).resolve())
        return dataclasses.replace(self, index_dir=fix(self.index_dir), sids_dir=fix(self.sids_dir),
                                   model_dir=fix(self.model_dir), store_url=url)
