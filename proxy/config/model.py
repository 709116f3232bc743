"""The config model: frozen, validated dataclasses, built once by ``proxy.config.load``.

Nothing here is mutated after it is built: a reload builds a new Config and swaps the
reference.  Defaults live on these classes (and the settings classes they hold) only; the
reader passes them on instead of repeating them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from proxy.config.admin import Admin
from proxy.config.analysis import Analysis
from proxy.config.assignment import DecisionHeaders, Override, Sticky
from proxy.config.checks import RingHealthCheck
from proxy.config.credentials import Credential, UpstreamTLS
from proxy.config.health import HealthCheck, Outlier, PoolDown, Retries
from proxy.config.limits import Limits, ListenTLS
from proxy.config.proxies import TrustedProxies
from proxy.config.ringlimits import RateLimit
from proxy.config.rollout import Progression, StateFiles, Webhook
from proxy.config.rules import Rule
from proxy.config.values import Listen, Upstream


class Balance(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_REQUEST = "least_request"


@dataclass(frozen=True, slots=True)
class Pool:
    name: str
    servers: tuple[Upstream, ...]
    balance: Balance = Balance.ROUND_ROBIN
    connect_timeout: float = 2.0
    max_connections: int = 1000  # per pool, over all its servers
    keepalive_timeout: float = 15.0  # idle pooled connections are closed after this
    preserve_host: bool = True  # send the client's Host; False sends the server's host:port
    health: HealthCheck | None = None  # active checks; None: none
    outlier: Outlier | None = field(default_factory=Outlier)  # passive ejection; None: off
    retries: Retries | None = None  # None: no retries
    auth: tuple[Credential, ...] = ()  # headers set on every request (proxy.config.credentials)
    tls: UpstreamTLS | None = None  # https servers: CA, client certificate, name; None: defaults
    environment: str | None = None  # a free word; "production" is kept from other pools' rings


@dataclass(frozen=True, slots=True)
class Policy:
    timeout: float = 30.0  # request fully sent -> upstream response headers received
    idle_timeout: float = 60.0  # longest silence while streaming a body, either way
    max_concurrency: int | None = None  # in-flight requests on this ring; None = no limit
    add_headers: tuple[tuple[str, str], ...] = ()  # sent upstream, {ring}/{route} expanded
    rate_limit: RateLimit | None = None  # token bucket per ring per process; over it: 429
    max_body: int | None = None  # request body bytes (with the route's, the smaller); -> 413


@dataclass(frozen=True, slots=True)
class Ring:
    name: str
    pool: str
    rules: tuple[tuple[Rule, ...], ...] = ()  # any group matches; all rules of a group hold
    policy: Policy = field(default_factory=Policy)
    weight: int | None = None  # share of sticky buckets in basis points (0.01 %); None: none
    progression: Progression | None = None  # steps the weight advances along
    pinned: bool = False  # keeps its pool when a rollback takes the pool's other rings off
    on_pool_down: PoolDown = PoolDown.REFUSE  # no healthy server in its pool: 503 or next ring
    # Custom checks of the ring's version (e.g. /health/db), judged with its verdict.
    health_checks: tuple[RingHealthCheck, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    rings: tuple[Ring, ...]
    hosts: tuple[str, ...] = ()  # empty: any host
    path_prefix: str = "/"
    sticky: Sticky | None = None
    override: Override | None = None
    decision: DecisionHeaders = field(default_factory=DecisionHeaders)
    analysis: Analysis | None = None
    max_body: int | None = None  # request body bytes; more -> 413; None: no limit

    @property
    def default_ring(self) -> Ring:
        return self.rings[-1]


@dataclass(frozen=True, slots=True)
class AccessLog:
    enabled: bool = True
    path: str = "-"  # "-" is standard output


class LogFormat(StrEnum):
    TEXT = "text"  # one line per record: time level logger: message (control chars escaped)
    JSON = "json"  # one JSON object per line: time, level, logger, message, fields


@dataclass(frozen=True, slots=True)
class RequestIds:
    """The X-Request-Id a request carries upstream, in answers and in the access log."""

    # Keep a client's X-Request-Id when it is a sane token (1..max_length characters of
    # A-Z a-z 0-9 . _ : -); otherwise (or when False) the proxy generates one.
    trust_incoming: bool = True
    max_length: int = 128


# The bounds of ``max_length``: enough for a UUID or a W3C trace id with decorations, short
# enough for a log line.
REQUEST_ID_LENGTH = (1, 200)


@dataclass(frozen=True, slots=True)
class Metrics:
    enabled: bool = True  # per-ring Prometheus metrics and the in-process windows


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen = field(default_factory=lambda: Listen("127.0.0.1", 8080))
    pools: tuple[Pool, ...] = ()
    routes: tuple[Route, ...] = ()  # the reader requires at least one
    admin: Admin = field(default_factory=Admin)
    access_log: AccessLog = field(default_factory=AccessLog)
    shutdown_grace: float = 30.0
    metrics: Metrics = field(default_factory=Metrics)
    state: StateFiles = field(default_factory=StateFiles)
    webhooks: tuple[Webhook, ...] = ()
    limits: Limits = field(default_factory=Limits)  # what a client connection may take
    listen_tls: ListenTLS | None = None  # a second, TLS listener; None: none
    # Peers whose X-Forwarded-For/Forwarded name the client (none: the peer is the client).
    trusted_proxies: TrustedProxies = field(default_factory=TrustedProxies)
    drain_delay: float = 5.0  # after SIGTERM: /readyz says 503 this long, still serving
    # Processes serving clients: 1 is this one; N > 1 is a supervisor and N workers
    # (proxy.workers).  ``auto`` in the file is resolved to os.cpu_count() when read.
    workers: int = 1
    log_format: LogFormat = LogFormat.TEXT  # the process log's (stderr); not the access log's
    request_id: RequestIds = field(default_factory=RequestIds)
    revision: str = ""  # short hash of the file's bytes
    source: str = ""

    def pool(self, name: str) -> Pool:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)
