"""``ServeConfig``: every knob of stage 8, the two-tier Ray Serve graph, and the only place
its defaults are written. Each tier (``matcher``: the latency-sensitive HTTP ingress;
``generator``: the latency-tolerant LLM) has its own typed section: what the tier does plus
its Ray Serve deployment options, which ``app.build`` applies with ``.options(...)``; the
deployment classes themselves carry no sizes. ``WarmConfig`` (``leadre warm``) fills the same
store in bulk with the generator's defaults."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leadre.config import ConfigError
from leadre.model.config import GenerationConfig
from leadre.runtime import RayConfig
from leadre.serve.store import DEFAULT_URL


@dataclass
class DeploymentConfig:
    """Ray Serve deployment options of one tier (a Serve config YAML's ``deployments:``
    section overrides them per deployment).

    Sizes are the tier's own: the matcher's ``num_replicas`` / ``num_cpus``, the generator's
    ``generation.num_replicas`` / ``num_cpus`` / ``num_gpus`` (the pool of every decoder).

    Parameters:
        autoscaling_config: Ray Serve's autoscaling options (``min_replicas``,
            ``max_replicas``, ``target_ongoing_requests``, ...); unset: the tier's fixed
            replica count.
        max_ongoing_requests: requests one replica works on at once.
        max_queued_requests: requests a caller queues before it gets a back-pressure error
            (overload sheds with 503 instead of queueing forever).
        health_check_period_s / health_check_timeout_s: how often Serve calls a replica's
            health check, and how long it waits before restarting the replica.
        graceful_shutdown_timeout_s: a replica being stopped (scale-down, redeploy,
            ``leadre serve`` getting SIGTERM) finishes its requests in flight for at most this
            long (Serve's default, 20 s, is most of a ``shutdown_timeout_s``).
    """

    autoscaling_config: dict[str, Any] | None = field(default=None, metadata={
        "help": "Ray Serve autoscaling options; unset: the fixed replica count"})
    max_ongoing_requests: int = field(default=32, metadata={
        "help": "requests in flight per replica"})
    max_queued_requests: int = field(default=64, metadata={
        "help": "requests queued per caller before back-pressure (503)"})
    health_check_period_s: float = field(default=10.0, metadata={
        "help": "seconds between health checks of a replica"})
    health_check_timeout_s: float = field(default=30.0, metadata={
        "help": "a health check slower than this restarts the replica"})
    graceful_shutdown_timeout_s: float = field(default=5.0, metadata={
        "help": "a stopping replica finishes its requests in flight for at most this long"})

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"{name}: max_ongoing_requests must be >= 1")
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            raise ConfigError(f"{name}: max_queued_requests must be >= 1 (or -1: unbounded)")
        if self.health_check_period_s <= 0 or self.health_check_timeout_s <= 0:
            raise ConfigError(f"{name}: health check period and timeout must be > 0")
        if self.graceful_shutdown_timeout_s < 0:
            raise ConfigError(f"{name}: graceful_shutdown_timeout_s must be >= 0")

    def replicas(self) -> int:
        """The fixed replica count (unless autoscaling)."""
        raise NotImplementedError

    def ray_actor_options(self) -> dict[str, Any]:
        raise NotImplementedError

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options``."""
        opts: dict[str, Any] = {
            "ray_actor_options": self.ray_actor_options(),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s}
        if self.autoscaling_config:
            opts["autoscaling_config"] = dict(self.autoscaling_config)
        else:
            opts["num_replicas"] = self.replicas()
        return opts


# path -> (the file's identity when read, its token): one stat per admin request, one read
# per change. A Kubernetes Secret volume swaps a symlink to a new file: new inode and mtime.
_TOKEN_FILES: dict[str, tuple[tuple, str | None]] = {}


def read_token_file(path: str) -> str | None:
    """The token in ``path`` (surrounding whitespace stripped), re-read only when the file
    changes; None when it is missing, unreadable or empty (the admin routes then refuse)."""
    try:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        cached = _TOKEN_FILES.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        with open(path, encoding="utf-8") as f:
            token = f.read().strip() or None
    except (OSError, UnicodeDecodeError) as e:
        if _TOKEN_FILES.pop(path, None) is not None or path not in _UNREADABLE:
            logging.getLogger(__name__).warning("admin token file %s unreadable: %s", path, e)
            _UNREADABLE.add(path)
        return None
    _UNREADABLE.discard(path)
    _TOKEN_FILES[path] = (key, token)
    return token


_UNREADABLE: set[str] = set()


@dataclass
class MatcherConfig(DeploymentConfig):
    """The latency-sensitive tier, which is also the HTTP ingress: request limits, the admin
    endpoints, cached candidates + ScaNN (plus its deployment options).

    Parameters:
        num_replicas: fixed replica count; ignored when ``autoscaling_config`` is set.
        num_cpus: CPUs reserved per replica.
        k_default: ads per answer when the request has no ``k``.
        k_max: the largest ``k`` a request may ask for.
        max_recent_events: most ``recent_events`` one request may carry.
        max_body_bytes: request bodies above this size get 413.
        max_drain_bytes: an over-limit body up to this size is read and discarded before the
            413 goes out, so the client sees the answer instead of a connection reset; past
            it the connection is closed.
        admin_token: bearer token of the ``/admin/*`` endpoints, given literally: for tests
            and local use only, never production (it travels in the replicas' init
            arguments and the Serve config). Unset, each replica resolves the token itself at
            every admin request (:meth:`token`): from ``admin_token_file``, else from its
            own ``$LEADRE_ADMIN_TOKEN``; with none, the admin routes answer 403.
        admin_token_file: a file holding the admin token, e.g. a Kubernetes Secret mounted
            as a volume; re-read when it changes, so a rotated Secret applies without a
            redeploy (an environment variable cannot change in a running process). Unset:
            ``$LEADRE_ADMIN_TOKEN_FILE``. Set but unreadable or empty: the routes answer
            403 (no fallback to an older token).
        admin_port: serve the admin routes on this port only, from a one-replica ``Admin``
            deployment (:mod:`leadre.serve.admin`) that ``app.build_admin`` deploys as an
            application of its own; the public port then answers 404 for ``/admin/*``.
            Unset: the admin routes are on the public port, on every matcher replica.
        admin_host: the interface the admin port listens on (127.0.0.1: reachable only on
            the Admin replica's node, e.g. through ``kubectl port-forward``; or the pod IP).
        history_events: events (request + stored history) that build a real-time ANN query.
        ad_status_interval_s: how often a replica reads the store's live ad status (ads
            switched off without an index rebuild reach every replica within about this).
        watch_interval_s: how often a replica looks in the store for an index swapped in
            through another replica, and publishes the generation queue depth.
        enqueue_interval_s: cache misses are queued for generation in one store write per
            this interval, off the request path.
        store_deadline_ms: the request path's budget for its store reads (candidates, user
            context); past it the answer comes from the real-time ANN fallback, marked
            ``cache: "unavailable"``, and the read finishes in the background.
        store_threads: threads that run the store reads of the requests of one replica (the
            event loop never waits on the store; a hung store holds at most these).
        fresh_share: share of an answer taken from real-time ANN over a request's events that
            are newer than its cached candidates' basis (fresh intent); 0 turns it off.
        context_events: events kept in a user's stored context when a request's newer events
            are added to it (so their next generation sees them).
    """

    max_ongoing_requests: int = 64
    max_queued_requests: int = 256
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 15.0
    num_replicas: int = field(default=1, metadata={"help": "replicas (unless autoscaling)"})
    num_cpus: float = field(default=0.1, metadata={"help": "CPUs reserved per replica"})
    k_default: int = field(default=10, metadata={"help": "ads per answer when k is absent"})
    k_max: int = field(default=100, metadata={"help": "largest k a request may ask for"})
    max_recent_events: int = field(default=50, metadata={
        "help": "most recent_events a request may carry"})
    max_body_bytes: int = field(default=65_536, metadata={
        "help": "request bodies above this size get 413"})
    max_drain_bytes: int = field(default=64 * 2**20, metadata={
        "help": "over-limit bodies up to this size are drained so the 413 arrives"})
    admin_token: str | None = field(default=None, metadata={
        "help": "bearer token for /admin/*, literal: tests/local only, not production "
                "(default: admin_token_file, else each replica's $LEADRE_ADMIN_TOKEN)"})
    admin_token_file: str | None = field(default=None, metadata={
        "help": "file holding the admin token (a mounted Secret), re-read when it changes "
                "(default: $LEADRE_ADMIN_TOKEN_FILE)"})
    admin_port: int | None = field(default=None, metadata={
        "help": "serve /admin/* on this port only (an Admin deployment); unset: public port"})
    admin_host: str = field(default="127.0.0.1", metadata={
        "help": "interface of the admin port (127.0.0.1, or the pod IP)"})
    history_events: int = field(default=20, metadata={
        "help": "events (request + stored history) that build a real-time ANN query"})
    ad_status_interval_s: float = field(default=1.0, metadata={
        "help": "how often a replica reads the live ad status from the store"})
    watch_interval_s: float = field(default=2.0, metadata={
        "help": "how often a replica follows index swaps made through other replicas"})
    enqueue_interval_s: float = field(default=0.02, metadata={
        "help": "cache misses are queued for generation in one write per interval"})
    store_deadline_ms: float = field(default=10.0, metadata={
        "help": "budget of a request's store reads; past it: ANN fallback (cache unavailable)"})
    store_threads: int = field(default=8, metadata={
        "help": "threads for the store reads of one replica's requests"})
    fresh_share: float = field(default=0.3, metadata={
        "help": "share of a cache hit's answer from ANN over the request's newer events"})
    context_events: int = field(default=50, metadata={
        "help": "events kept in a stored user context when newer request events join it"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_replicas < 1:
            raise ConfigError(f"matcher: num_replicas must be >= 1, got {self.num_replicas}")
        if self.num_cpus < 0:
            raise ConfigError(f"matcher: num_cpus must be >= 0, got {self.num_cpus}")
        if not 1 <= self.k_default <= self.k_max:
            raise ConfigError(f"need 1 <= k_default <= k_max, got {self.k_default}, {self.k_max}")
        if self.max_body_bytes < 256:
            raise ConfigError("max_body_bytes must be >= 256")
        if self.max_drain_bytes < self.max_body_bytes:
            raise ConfigError("max_drain_bytes must be >= max_body_bytes")
        if self.max_recent_events < 0 or self.history_events < 0:
            raise ConfigError("max_recent_events and history_events must be >= 0")
        for name in ("ad_status_interval_s", "watch_interval_s", "enqueue_interval_s",
                     "store_deadline_ms"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        if self.store_threads < 1 or self.context_events < 1:
            raise ConfigError("store_threads and context_events must be >= 1")
        if not 0.0 <= self.fresh_share <= 1.0:
            raise ConfigError(f"fresh_share is a share in [0, 1], got {self.fresh_share}")
        if self.admin_port is not None and not 1 <= self.admin_port <= 65535:
            raise ConfigError(f"matcher: admin_port must be in 1..65535, got {self.admin_port}")

    def token(self) -> str | None:
        """The admin token now, resolved where it is called (the replica, at each admin
        request; never on the driver): ``admin_token`` if given (tests, local use); else the
        file ``admin_token_file`` / ``$LEADRE_ADMIN_TOKEN_FILE`` (re-read when it changes;
        unreadable or empty: None); else ``$LEADRE_ADMIN_TOKEN``."""
        if self.admin_token:
            return self.admin_token
        path = self.admin_token_file or os.environ.get("LEADRE_ADMIN_TOKEN_FILE")
        if path:
            return read_token_file(path)
        return os.environ.get("LEADRE_ADMIN_TOKEN") or None

    def replicas(self) -> int:
        return self.num_replicas

    def ray_actor_options(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus}


def serving_generation() -> GenerationConfig:
    """The generator tier's decoding defaults (``warm`` writes the same candidates): 20
    candidates per user, 16 users per ``@serve.batch``, a small CPU reservation so the tier
    shares a node with the matcher."""
    return GenerationConfig(beam_size=20, top_k=20, batch_size=16, num_cpus=0.1)


@dataclass
class GeneratorConfig(DeploymentConfig):
    """The latency-tolerant tier: the LLM (or the embedding baseline) writing candidates to the
    store (plus its deployment options; GPUs here).

    Parameters:
        generation: decoding and the replica pool (:class:`~leadre.model.config.
            GenerationConfig`): ``top_k`` candidates per user, ``beam_size``, ``batch_size``
            users per ``@serve.batch`` call (and prompts decoded together), ``num_replicas``,
            ``num_cpus``, ``num_gpus`` (unset: 1 when the cluster has GPUs, else 0).
        ttl_s: lifetime of generated candidates in the store.
        batch_wait_s: how long ``@serve.batch`` waits to fill a batch.
        poll_interval_s: how often an idle replica looks at the store's queue.
        lease_s: a claimed queue entry returns to the queue after this (a dead replica's).
        idle_priority: run the replica's threads under Linux's ``SCHED_IDLE`` policy: they get
            a core only when no other thread wants it, so where the tiers share cores the
            matcher's requests never wait behind the LLM (niceness alone leaves the LLM a
            share: Ray starts workers at niceness 15, and 15 + 10 is capped at 19).
        niceness: added to the replica process's CPU niceness: where the tiers share cores,
            the LLM yields them to the matcher's requests (0 leaves it as Ray starts it).
    """

    max_ongoing_requests: int = 64
    max_queued_requests: int = 256
    health_check_period_s: float = 5.0
    generation: GenerationConfig = field(default_factory=serving_generation, metadata={
        "help": "decoding (top_k, beam_size, batch_size, ...) and replicas (num_replicas, "
                "num_cpus, num_gpus)"})
    ttl_s: float = field(default=86_400.0, metadata={"help": "lifetime of generated candidates"})
    batch_wait_s: float = field(default=0.05, metadata={"help": "@serve.batch wait timeout"})
    poll_interval_s: float = field(default=0.5, metadata={
        "help": "how often an idle generator replica looks at the store's queue"})
    lease_s: float = field(default=120.0, metadata={
        "help": "a claimed queue entry returns to the queue after this (dead replica)"})
    niceness: int = field(default=10, metadata={
        "help": "CPU niceness added to generator replicas (they yield shared cores)"})
    idle_priority: bool = field(default=True, metadata={
        "help": "generator replicas run under Linux SCHED_IDLE: CPU only when nothing else "
                "wants it"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.niceness <= 19:
            raise ConfigError("niceness must be in 0..19")
        if self.ttl_s <= 0:
            raise ConfigError("ttl_s must be > 0")
        if self.batch_wait_s < 0 or self.poll_interval_s <= 0 or self.lease_s <= 0:
            raise ConfigError("batch_wait_s must be >= 0, poll_interval_s and lease_s > 0")

    def replicas(self) -> int:
        return self.generation.num_replicas

    def ray_actor_options(self) -> dict[str, Any]:
        # num_gpus unset is decided here, on the driver, where the cluster is known
        return self.generation.ray_resources()


@dataclass(frozen=True)
class ServePaths:
    """Where the tiers read from and write to; :meth:`absolute` before shipping to replicas.

    Parameters:
        sids_dir: output of ``leadre sids``.
        store_url: the candidate store.
        index_dir: output of ``leadre index`` (the matcher needs it; so does the embedding
            generator).
        model_dir: output of ``leadre sft`` / ``leadre dpo``; None: embedding generator.
        index_root: index directories are loaded only from under this directory (swaps
            included); None: the parent directory of ``index_dir``.
    """

    sids_dir: str
    store_url: str
    index_dir: str | None = None
    model_dir: str | None = None
    index_root: str | None = None

    def absolute(self) -> "ServePaths":
        """Paths made absolute on the driver: replicas may run with another working dir."""

        def fix(p: str | None) -> str | None:
            return p if p is None or "://" in p else str(Path(p).expanduser().resolve())

        url = self.store_url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            url = "sqlite:///" + str(Path(url[len("sqlite:///"):]).resolve())
        elif "://" not in url:
            url = "sqlite:///" + str(Path(url).resolve())
        root = self.index_root
        if root is None and self.index_dir is not None:
            root = self.index_dir.rstrip("/").rsplit("/", 1)[0] if "://" in self.index_dir \
                else str(Path(self.index_dir).expanduser().resolve().parent)
        return ServePaths(sids_dir=fix(self.sids_dir), store_url=url,
                          index_dir=fix(self.index_dir), model_dir=fix(self.model_dir),
                          index_root=fix(root))

    def check(self) -> str:
        """Refuse, on the driver and before any replica or actor starts, input directories
        the tiers would fail on only inside Ray: each must exist and hold the manifest of its
        stage (``sids``; ``index``, under ``index_root``; ``sft``/``dpo`` with its model
        written, or a plain Hugging Face model directory), and the index and the model must be
        built from the S-IDs of ``sids_dir`` (the error names both versions). Returns that
        S-ID version. ``leadre serve``, ``build_app`` and ``leadre warm`` all call it."""
        from leadre.artifacts import check_model, check_sid_version, read_manifest
        from leadre.index.verify import check_under_root
        from leadre.sids import load_table

        version = load_table(self.sids_dir).version
        if self.index_dir is not None:
            built = read_manifest(self.index_dir, stage="index")
            # Indexes record it as an input (older ones only there).
            built = {"sid_version": built.get("sid_version") or
                     (built.get("inputs") or {}).get("sids_version")}
            check_sid_version(f"the index in {self.index_dir}", built, version, self.sids_dir)
            check_under_root(self.index_dir, self.index_root)  # the replicas load only from there
        if self.model_dir is not None:
            check_model(self.model_dir, version, self.sids_dir)
        return version


@dataclass
class ServeConfig:
    """Configuration of ``leadre serve`` and of ``leadre.serve:build_app`` (the ``args:`` of a
    ``serve_configs/*.yaml`` application).

    Parameters:
        index_dir: output of ``leadre index`` (ScaNN over active ads).
        index_root: the only directory index directories are loaded from (the admin swap and
            the store's recorded index included); unset: the parent of ``index_dir``.
        sids_dir: output of ``leadre sids`` (S-ID table, embeddings, text encoder).
        model_dir: output of ``leadre sft`` / ``leadre dpo``; ``None`` runs the generator with
            the embedding baseline (history -> nearest ads) so the graph works before training.
        store_url: candidate store, ``sqlite:///path.db`` (embedded) or ``redis://host:port/0``.
        host / port / app_name / route_prefix: where ``leadre serve`` answers HTTP.
        high_throughput: when ``leadre serve`` starts its own Ray cluster, start it in Ray
            Serve's high-throughput mode (HAProxy in front of the replicas' own HTTP servers,
            gRPC between tiers): about 1 ms of CPU per request instead of ~8. On a cluster
            this is the nodes' environment (``deploy/rayservice.yaml``).
        matcher / generator: each tier's knobs and deployment options
            (:class:`MatcherConfig`, :class:`GeneratorConfig`), e.g.
            ``--set generator.generation.num_gpus=1`` or ``generator: {ttl_s: 3600}`` in YAML.
        ray: how to reach Ray. blocking: ``leadre serve`` keeps running until Ctrl-C.
        shutdown_timeout_s: after Ctrl-C or SIGTERM, how long ``serve.shutdown()`` (the
            replicas finish the requests in flight) may take before the command exits anyway
            (its own local cluster goes with the process).
    """

    index_dir: str = field(default="runs/index", metadata={"help": "output of `leadre index`"})
    index_root: str | None = field(default=None, metadata={
        "help": "index directories load only from under here (default: parent of index_dir)"})
    sids_dir: str = field(default="runs/sids", metadata={"help": "output of `leadre sids`"})
    model_dir: str | None = field(default=None, metadata={
        "help": "output of `leadre sft`/`leadre dpo`; unset: embedding-baseline generator"})
    store_url: str = field(default=DEFAULT_URL, metadata={
        "help": "candidate store: sqlite:///path.db (embedded) or redis://host:port/0"})
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP host (leadre serve)"})
    port: int = field(default=8000, metadata={"help": "HTTP port (leadre serve)"})
    app_name: str = field(default="leadre", metadata={"help": "Serve application name"})
    route_prefix: str = field(default="/", metadata={"help": "HTTP route prefix"})
    high_throughput: bool = field(default=True, metadata={
        "help": "leadre serve's own cluster runs Serve's HAProxy + direct-ingress mode"})
    matcher: MatcherConfig = field(default_factory=MatcherConfig, metadata={
        "help": "HTTP + ScaNN tier: request limits, admin token, deployment options"})
    generator: GeneratorConfig = field(default_factory=GeneratorConfig, metadata={
        "help": "LLM tier: TTL, beams, batching, queue, deployment options (GPUs)"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "how to reach Ray"})
    blocking: bool = field(default=True, metadata={
        "help": "leadre serve: keep running until Ctrl-C (false: deploy and return)"})
    shutdown_timeout_s: float = field(default=30.0, metadata={
        "help": "after Ctrl-C/SIGTERM, wait this long for Serve to drain, then exit anyway"})

    def __post_init__(self) -> None:
        if self.shutdown_timeout_s <= 0:
            raise ConfigError(f"serve: shutdown_timeout_s must be > 0, "
                              f"got {self.shutdown_timeout_s}")
        if self.matcher.admin_port is not None and self.matcher.admin_port == self.port:
            raise ConfigError(f"serve: matcher.admin_port must differ from the public port "
                              f"{self.port}")

    def paths(self) -> ServePaths:
        """The artifact paths and store URL, absolute (computed on the driver)."""
        return ServePaths(sids_dir=self.sids_dir, store_url=self.store_url,
                          index_dir=self.index_dir, model_dir=self.model_dir,
                          index_root=self.index_root).absolute()


@dataclass
class WarmConfig:
    """Configuration of the store warm-up job.

    Parameters:
        ingest_dir: output of ``leadre ingest`` (users, events, ads).
        sids_dir / index_dir / model_dir: as in ``ServeConfig``; ``model_dir`` unset uses the
            embedding baseline generator.
        store_url: the serving store (``sqlite:///...`` on one node, ``redis://`` on a cluster).
        ttl_s / generation: the candidates' lifetime and how they are decoded, as the serving
            generator does (its defaults), with its own pool of ``generation.num_replicas``
            Ray Data actors (``num_cpus`` / ``num_gpus`` each) and ``batch_size`` users per
            batch.
        max_events / active_days / context_batch_size / contexts_only: which users and how
            much of their history are stored, and whether to generate at all.
    """

    ingest_dir: str = field(default="runs/ingest", metadata={"help": "output of `leadre ingest`"})
    sids_dir: str = field(default="runs/sids", metadata={"help": "output of `leadre sids`"})
    index_dir: str = field(default="runs/index", metadata={"help": "output of `leadre index`"})
    model_dir: str | None = field(default=None, metadata={
        "help": "output of `leadre sft`/`leadre dpo`; unset: embedding baseline"})
    store_url: str = field(default=DEFAULT_URL, metadata={
        "help": "candidate store URL (redis://... when workers run on several nodes)"})
    # Candidates as the serving generator writes them, so its defaults (but its own pool).
    ttl_s: float = field(default=GeneratorConfig.ttl_s, metadata={
        "help": "lifetime of the candidates"})
    generation: GenerationConfig = field(
        default_factory=lambda: dataclasses.replace(serving_generation(), batch_size=64,
                                                     num_cpus=1.0),
        metadata={"help": "decoding (top_k, beam_size, batch_size users per batch, ...) and "
                          "the actor pool (num_replicas, num_cpus, num_gpus)"})
    max_events: int = field(default=50, metadata={"help": "behaviours kept per user context"})
    active_days: int | None = field(default=None, metadata={
        "help": "warm users active in the last N days of the log (unset: all with events)"})
    context_batch_size: int = field(default=20_000, metadata={
        "help": "users per context-building task"})
    contexts_only: bool = field(default=False, metadata={
        "help": "write user contexts only (serving then generates on demand)"})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "how to reach Ray"})

    def __post_init__(self) -> None:
        if self.active_days is not None and self.active_days < 1:
            raise ConfigError("active_days must be >= 1 when set")
