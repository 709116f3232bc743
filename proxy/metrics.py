"""Per-ring metrics: Prometheus exposition, the judge's tallies, the recent windows.

The one module that imports prometheus_client.  Per request the handler calls
``RingRecorder.record`` (through ``RingRuntime.recorder``), which adds to plain integers,
the ring's :class:`~proxy.rollout.evidence.Tally` (what the judge reads) and a
:class:`~proxy.rollout.window.RingWindow` (recent traffic for people): no label lookup, no
lock, no prometheus_client call.

Only what the ring's upstream did is judged (recorded into the tally and the window): an
answer, an error when its status is one of the route's ``error_statuses``, or the upstream
failing to give one (connect, reset, timeout, bad_response).  The proxy's own refusals
(``refused``: a full max_concurrency, a rate_limit's 429), clients that went away
(``client_closed``), clients whose request the proxy refused (``bad_request``) and
defects of the proxy (``internal``) are counted in Prometheus only, each in its own code
class or kind.

Everything runs on the event loop thread, so a scrape (also on that thread) reads a
consistent snapshot.  At scrape time :meth:`Metrics.collect` turns the recorders, and the
live runtime state (in-flight, weights, phases, the last verdicts), into metric families;
a ring that left the config is simply no longer collected, so its series disappear.

Label values come only from config names (route, ring, pool) and the fixed sets below.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

from proxy.config.analysis import SERVER_ERRORS
from proxy.dataplane.decide import RATE_LIMITED
from proxy.dataplane.exchange import INTERNAL
from proxy.dataplane.upstream import UpstreamPool
from proxy.health.retry import REASONS as RETRY_REASONS
from proxy.rollout.evidence import Tally
from proxy.rollout.judge import Finding
from proxy.rollout.sketch import index_of
from proxy.rollout.window import LATENCY_BUCKETS, RingWindow, Summary
from proxy.runtime import RingRuntime, Runtime

# code_class: the status class sent to the client; "error" when the proxy answered
# itself because the upstream failed (502/504); "client_closed" when the client went away
# before any response was sent; "internal" when a defect of the proxy failed the request
# (a 500 or a cut response, logged with its traceback); "refused" when the proxy answered
# 503 itself because the ring's max_concurrency was full, or 429 for its rate_limit.
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "error", "client_closed", "internal",
                "refused")
ERROR_KINDS = ("connect", "timeout", "reset", "bad_response", "overload", "no_server")
DIRECTIONS = ("sent", "received")  # request body bytes sent upstream / response body received
RELOAD_RESULTS = ("success", "failure")

_ERROR, _CLIENT_CLOSED, _INTERNAL, _REFUSED = 5, 6, 7, 8
NONSTANDARD = frozenset(range(600, 1000))  # statuses that are errors whatever the route says
_OVERLOAD = ERROR_KINDS.index("overload")
# status // 100 -> index into CODE_CLASSES.  0 (nothing sent) is an error; the
# non-standard 600-999 that aiohttp's parser accepts count as 5xx.
_CLASS_OF = (_ERROR, 0, 1, 2, 3, 4, 4, 4, 4, 4)
_KIND_INDEX = {kind: i for i, kind in enumerate(ERROR_KINDS)}
_LOCAL_STATUS = frozenset({502, 503, 504})  # what the proxy answers for an UpstreamError
_LE = (*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf")  # "0.001" ... "10.0", as Go writes them

RING_LABELS = ("route", "ring", "pool")
FINDINGS = tuple(f.value for f in Finding)


def _version() -> str:
    try:
        return importlib.metadata.version("ringproxy")
    except importlib.metadata.PackageNotFoundError:  # run from a tree that is not installed
        return "unknown"


BUILD = {"version": _version(), "python": platform.python_version()}


class RingRecorder:
    """One ring's counters, tally and window.  ``RingRuntime.recorder`` points here.

    ``error_statuses`` are the upstream statuses the ring's route counts as errors (the
    metrics layer updates them when a reload changes them); the non-standard 600-999
    that aiohttp's parser accepts are always errors.
    """

    __slots__ = (
        "buckets",
        "duration_sum",
        "error_statuses",
        "labels",
        "received",
        "requests",
        "ring",
        "route",
        "sent",
        "tally",
        "upstream_errors",
        "window",
    )

    def __init__(self, route: str, ring: str, pool: str, window: RingWindow,
                 error_statuses: frozenset[int] = SERVER_ERRORS) -> None:
        self.route = route
        self.ring = ring
        self.labels = (route, ring, pool)
        self.requests = [0] * len(CODE_CLASSES)
        self.upstream_errors = [0] * len(ERROR_KINDS)
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, last is +Inf
        self.duration_sum = 0.0
        self.sent = 0
        self.received = 0
        self.window = window
        self.tally = Tally()
        self.error_statuses = error_statuses | NONSTANDARD

    def record(
        self,
        status: int,
        error: str,
        duration: float,
        bytes_in: int,
        bytes_out: int,
        now: float,
    ) -> None:
        """Count one finished request (called by the handler, once per request)."""
        self.sent += bytes_in
        self.received += bytes_out
        if error or status < 100:
            self._unusual(status, error, duration, now)
            return
        # The upstream's answer: counted, judged, and timed unless it is a WebSocket's
        # 101 (the session ends when it ends: not a latency).
        self.requests[_CLASS_OF[status // 100]] += 1
        failed = status in self.error_statuses
        if status == 101:
            self.tally.record(failed, None)
            self.window.record(now, None, failed)
            return
        bucket = bisect_left(LATENCY_BUCKETS, duration)
        self.buckets[bucket] += 1
        self.duration_sum += duration
        # Tally.record(failed, duration), inline: a call less per request.
        tally = self.tally
        tally.requests += 1
        if failed:
            tally.errors += 1
        tally.latency[index_of(duration)] += 1
        self.window.add(now, bucket, failed)

    def attempt(self, status: int, error: str, duration: float, now: float) -> None:
        """A failed attempt that a retry follows: judged for the ring's version like a
        request (the tally, the window, the upstream errors by kind), though no request
        ended with it (``requests`` and the latency histogram count requests)."""
        kind = _KIND_INDEX.get(error)
        if kind is not None:
            self.upstream_errors[kind] += 1
            failed = True
        else:
            failed = status in self.error_statuses
        bucket = bisect_left(LATENCY_BUCKETS, duration)
        self.tally.record(failed, duration)
        self.window.add(now, bucket, failed)

    def _unusual(self, status: int, error: str, duration: float, now: float) -> None:
        """Everything but a plain upstream answer: failures, refusals, clients, defects."""
        if error == INTERNAL:
            # A defect of the proxy says nothing about the ring's version: counted to be
            # seen, kept out of the latencies and of what is judged.
            self.requests[_INTERNAL] += 1
            return
        kind = _KIND_INDEX.get(error)
        judged = False
        if error == RATE_LIMITED:
            # The proxy's own 429: the ring's policy.rate_limit (never the version's error).
            cls = _REFUSED
        elif kind == _OVERLOAD:
            # The proxy's own 503: the ring's max_concurrency was full (clients filled
            # it; the upstream did nothing wrong).
            self.upstream_errors[kind] += 1
            cls = _REFUSED
        elif kind is not None:
            # The upstream gave no usable answer: the proxy's own 502/504 (an upstream
            # failure after its headers went out keeps the status class the client saw).
            self.upstream_errors[kind] += 1
            cls = _ERROR if status in _LOCAL_STATUS else _CLASS_OF[status // 100]
            judged = True
        elif status == 0:
            # The client left before any response (client_closed), or nothing was sent
            # for no known reason (judged: the old, cautious reading).
            cls = _CLIENT_CLOSED if error else _ERROR
            judged = not error
        else:
            # The client left mid-response, or its request was refused (bad_request).
            cls = _CLASS_OF[status // 100]
        self.requests[cls] += 1
        bucket = bisect_left(LATENCY_BUCKETS, duration)
        self.buckets[bucket] += 1
        self.duration_sum += duration
        if judged:
            self.tally.record(True, duration)
            self.window.add(now, bucket, True)

    def __repr__(self) -> str:
        return (f"<RingRecorder {self.route}/{self.ring} pool={self.labels[2]} "
                f"requests={sum(self.requests)}>")


def plain_gauges(
    source: Callable[[], Iterable[tuple[str, str, float]]],
) -> Callable[[], Iterator[Metric]]:
    """An ``extra`` collector of unlabelled gauges, read as (name, help, value) at scrape
    time (``proxy.fleet.member``: backend up, leading, state version)."""
    def collect() -> Iterator[Metric]:
        for name, text, number in source():
            family = GaugeMetricFamily(name, text)
            family.add_metric((), number)
            yield family
    return collect


def worker_families(ready: int, restarts: list[int], requests: list[int], missed: int,
                    unmatched: int) -> Iterator[Metric]:
    """A supervisor's own series (``proxy.workers``): its workers, per worker index."""
    workers = GaugeMetricFamily(
        "ringproxy_workers", "Worker processes: configured, and ready (serving).",
        labels=("state",))
    workers.add_metric(("configured",), len(restarts))
    workers.add_metric(("ready",), ready)
    yield workers
    restarted = CounterMetricFamily(
        "ringproxy_worker_restarts", "Worker processes restarted after they exited.",
        labels=("worker",))
    served = CounterMetricFamily(
        "ringproxy_worker_requests", "Finished requests by the worker that served them.",
        labels=("worker",))
    for index, (r, n) in enumerate(zip(restarts, requests, strict=True)):
        restarted.add_metric((str(index),), r)
        served.add_metric((str(index),), n)
    yield restarted
    yield served
    yield CounterMetricFamily(
        "ringproxy_worker_reports_missed", "Reports a worker did not send within the "
        "flush timeout of a scrape or an admin read (those numbers came later).",
        value=missed)
    yield CounterMetricFamily(
        "ringproxy_worker_reports_unmatched", "Per-ring reports for a ring the "
        "supervisor no longer has (sent just before a reload removed it): dropped.",
        value=unmatched)


class UpstreamView(Protocol):
    """Other processes' view of the upstream servers (a supervisor's workers): merged
    into the pools' series at scrape time."""

    def available(self, pool: str, server: str) -> bool: ...  # in rotation everywhere
    def ejections(self, pool: str, server: str) -> int: ...  # ejections elsewhere, total
class ChecksSource(Protocol):
    """What ``proxy.checks.runner.CheckRunner`` offers the scrape (plain numbers)."""

    def counts(self) -> Mapping[tuple[str, str, str, str], int]: ...

    def values(self) -> Mapping[tuple[str, str, str], float]: ...


class Metrics:
    """A proxy's metrics: its own registry, the ring recorders, config and reload state.

    ``attach(runtime)`` after building a Runtime (at start and on every reload, before the
    handler sees it): rings whose (route, ring, pool) survive keep their recorder, so
    counters, tallies and windows carry on (with the route's error statuses as the new
    config says); the others start at zero; rings that left stop being collected.  With
    ``metrics.enabled: false`` no recorder is attached, no per-ring series are exported
    and nothing is analysed.
    """

    def __init__(
        self,
        window_horizon: float = 300.0,
        window_resolution: float = 1.0,
        process_metrics: bool = True,
        window_factory: Callable[[], RingWindow] | None = None,
    ) -> None:
        RingWindow(window_horizon, window_resolution)  # validate the arguments now
        self.window_horizon = window_horizon
        self.window_resolution = window_resolution
        # What a new recorder's window is (a worker process's keeps only what it has not
        # reported yet: proxy.workers.deltas); None: a RingWindow over the horizon.
        self.window_factory = window_factory
        # Set by a supervisor of worker processes (proxy.workers): the workers' view of
        # the servers.
        self.upstream_view: UpstreamView | None = None
        # More metric families at scrape time, from other parts: a supervisor's
        # (``worker_families``), a fleet member's (``plain_gauges``).
        self.extra: list[Callable[[], Iterable[Metric]]] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        if process_metrics:
            ProcessCollector(registry=self.registry)
        self._recorders: dict[tuple[str, str, str], RingRecorder] = {}
        self._by_ring: dict[tuple[str, str], RingRecorder] = {}
        self._rings: tuple[RingRuntime, ...] = ()
        self._pools: tuple[UpstreamPool, ...] = ()
        self._runtime: Runtime | None = None
        self._rollbacks: dict[tuple[str, str, str], int] = {}
        self._revision = ""
        self._reload_ok = 1.0
        self._reload_time = 0.0
        self._reloads = [0] * len(RELOAD_RESULTS)
        self.checks_source: ChecksSource | None = None  # external checks' results

    # ------------------------------------------------------------------ wiring

    def attach(self, runtime: Runtime) -> None:
        """Give every ring of ``runtime`` its recorder (or none, when metrics are off)."""
        rings = tuple(r for route_rings in runtime.rings.values() for r in route_rings)
        self._pools = tuple(runtime.pools.values())
        self._runtime = runtime
        if not runtime.config.metrics.enabled:
            for ring in rings:
                ring.recorder = None
            self._recorders, self._by_ring, self._rings = {}, {}, ()
            self._rollbacks.clear()
            return
        statuses = {route.name: route.analysis.error_statuses if route.analysis else
                    SERVER_ERRORS for route in runtime.config.routes}
        recorders: dict[tuple[str, str, str], RingRecorder] = {}
        for ring in rings:
            key = (ring.route, ring.name, ring.pool.config.name)
            recorder = self._recorders.get(key)
            if recorder is None:
                window = (self.window_factory() if self.window_factory is not None else
                          RingWindow(self.window_horizon, self.window_resolution))
                recorder = RingRecorder(*key, window)
            recorder.error_statuses = statuses.get(ring.route, SERVER_ERRORS) | NONSTANDARD
            recorders[key] = recorder
            ring.recorder = recorder
        self._recorders = recorders
        self._by_ring = {(r.route, r.ring): r for r in recorders.values()}
        self._rings = rings
        self._rollbacks = {k: v for k, v in self._rollbacks.items() if k[:2] in self._by_ring}

    def window(self, route: str, ring: str, now: float, seconds: float) -> Summary:
        """The ring's last ``seconds`` (``now`` on the handler's clock, time.monotonic())."""
        return self._recorder(route, ring).window.summary(now, seconds)

    def recorders(self) -> dict[tuple[str, str, str], RingRecorder]:
        """Every ring's recorder by (route, ring, pool): what a worker reports, and where
        its supervisor adds what the workers report (``proxy.workers.deltas``)."""
        return self._recorders

    def tally(self, route: str, ring: str) -> Tally:
        """The ring's running totals of judged requests (the same object while its
        recorder lives: a new one, from zero, when the ring's pool changes)."""
        return self._recorder(route, ring).tally

    def _recorder(self, route: str, ring: str) -> RingRecorder:
        try:
            return self._by_ring[route, ring]
        except KeyError:
            known = ", ".join(f"{a}/{b}" for a, b in self._by_ring) or "none"
            raise KeyError(f"no metrics for ring {route}/{ring} (rings: {known})") from None

    # ------------------------------------------------------------------ events

    def config_loaded(self, revision: str) -> None:
        """The config the proxy started with (not counted as a reload)."""
        self._revision = revision
        self._reload_ok = 1.0
        self._reload_time = time.time()

    def reload_succeeded(self, revision: str) -> None:
        self.config_loaded(revision)
        self._reloads[0] += 1

    def reload_failed(self) -> None:
        """A rejected config: the last good one (and its revision) keeps serving."""
        self._reload_ok = 0.0
        self._reloads[1] += 1

    def rollback(self, route: str, ring: str, reason: str) -> None:
        """Count a rollback; ``reason`` must come from a fixed set (it is a label value)."""
        key = (route, ring, reason)
        self._rollbacks[key] = self._rollbacks.get(key, 0) + 1

    # ------------------------------------------------------------------ exposition

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape body and its Content-Type, negotiated from an Accept header."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            "ringproxy_build_info", "Always 1; the running ringproxy's version and Python "
            "(the config's revision is ringproxy_config_info).", labels=tuple(BUILD))
        build.add_metric(tuple(BUILD.values()), 1.0)
        yield build
        yield from self._traffic()
        yield from self._rings_now()
        yield from self._upstreams()
        yield from self._config_and_rollbacks()
        for more in self.extra:
            yield from more()
        yield from self._external_checks()

    def _external_checks(self) -> Iterator[Metric]:
        """The external checks' results (``proxy.checks``), when a source is attached."""
        source = self.checks_source
        if source is None:
            return
        runs = CounterMetricFamily(
            "ringproxy_external_checks", "Results of external checks (Prometheus, webhook, "
            "custom health) by status: pass, fail, no_data.",
            labels=("route", "ring", "check", "status"))
        for labels, n in source.counts().items():
            runs.add_metric(labels, n)
        yield runs
        value = GaugeMetricFamily(
            "ringproxy_external_check_value", "The last value an external check saw (a "
            "query's number, an HTTP status).", labels=("route", "ring", "check"))
        for key, v in source.values().items():
            value.add_metric(key, v)
        yield value

    def _traffic(self) -> Iterator[Metric]:
        """What the rings' recorders counted."""
        requests = CounterMetricFamily(
            "ringproxy_requests", "Finished requests by ring and status class sent to the "
            "client (error: the proxy answered 502/504 itself, the upstream failed; refused: "
            "the proxy answered 503 itself, the ring's max_concurrency was full, or 429 "
            "for its rate_limit; "
            "client_closed: the client left before a response; internal: a defect of the "
            "proxy failed it).",
            labels=(*RING_LABELS, "code_class"))
        errors = CounterMetricFamily(
            "ringproxy_upstream_errors", "Upstream failures by kind, including those after the "
            "response started (overload: the ring's max_concurrency was full).",
            labels=(*RING_LABELS, "kind"))
        durations = HistogramMetricFamily(
            "ringproxy_request_duration_seconds", "Time from request received to response "
            "finished, WebSocket sessions excluded.", labels=RING_LABELS)
        sent_received = CounterMetricFamily(
            "ringproxy_upstream_bytes", "Body bytes sent to (request) and received from "
            "(response) the ring's upstreams.", labels=("route", "ring", "direction"))
        for rec in self._recorders.values():
            for cls, n in zip(CODE_CLASSES, rec.requests, strict=True):
                requests.add_metric((*rec.labels, cls), n)
            for kind, n in zip(ERROR_KINDS, rec.upstream_errors, strict=True):
                errors.add_metric((*rec.labels, kind), n)
            cumulative, buckets = 0, []
            for le, n in zip(_LE, rec.buckets, strict=True):
                cumulative += n
                buckets.append((le, float(cumulative)))
            durations.add_metric(rec.labels, buckets, rec.duration_sum)
            sent_received.add_metric((rec.route, rec.ring, "sent"), rec.sent)
            sent_received.add_metric((rec.route, rec.ring, "received"), rec.received)
        yield requests
        yield durations
        yield errors
        yield sent_received
        unrouted = CounterMetricFamily(
            "ringproxy_unrouted_requests", "Requests that matched no route (answered 404 by "
            "the proxy).", value=self._runtime.unrouted.value if self._runtime else 0)
        yield unrouted

    def _rings_now(self) -> Iterator[Metric]:
        """The live state of each ring: in flight, weight, phase, its analysis."""
        inflight = GaugeMetricFamily(
            "ringproxy_inflight_requests", "Requests (and open WebSockets) in flight on the "
            "ring.", labels=("route", "ring"))
        weight = GaugeMetricFamily(
            "ringproxy_ring_weight_percent", "Share of sticky buckets the ring owns now, in "
            "percent.", labels=("route", "ring"))
        phase = GaugeMetricFamily(
            "ringproxy_ring_phase", "1 for the ring's current rollout phase.",
            labels=("route", "ring", "phase"))
        starved = GaugeMetricFamily(
            "ringproxy_ring_analysis_starved", "1 when the ring's analysis stayed undecided "
            "for the route's max_blind in the current step (it does not advance), else 0.",
            labels=("route", "ring"))
        progress = GaugeMetricFamily(
            "ringproxy_ring_evidence_progress", "How far the evidence of the ring's last "
            "verdict is toward a rollback, per check: 0 none, 1 rolled back (log scale of "
            "the anytime-valid p-value against the check's alpha).",
            labels=("route", "ring", "check"))
        finding = GaugeMetricFamily(
            "ringproxy_ring_check_finding", "1 for what the ring's last verdict found, per "
            "check (worse: rolls back; within: tolerance held; undecided), 0 for the others.",
            labels=("route", "ring", "check", "finding"))
        p_value = GaugeMetricFamily(
            "ringproxy_ring_check_p_value", "The anytime-valid p-value of \"within tolerance\" "
            "in the ring's last verdict, per check (it rolls back at the check's alpha).",
            labels=("route", "ring", "check"))
        # Read off RingRuntime.verdict, which the controller sets once per analysis round:
        # nothing is kept or updated per request.
        for ring in self._rings:
            inflight.add_metric((ring.route, ring.name), ring.inflight)
            # A ring with only rules has no weight; one the rollout loop does not run
            # has no phase.
            if ring.weight is not None:
                weight.add_metric((ring.route, ring.name), float(ring.weight))
            if ring.phase is not None:
                phase.add_metric((ring.route, ring.name, str(ring.phase)), 1.0)
                starved.add_metric((ring.route, ring.name), float(ring.starved))
            if ring.verdict is not None:
                for check in ring.verdict.checks:  # names from the config: a bounded set
                    labels = (ring.route, ring.name, check.name)
                    progress.add_metric(labels, check.progress)
                    p_value.add_metric(labels, check.p_value)
                    for value in FINDINGS:
                        finding.add_metric((*labels, value), float(check.finding == value))
        yield inflight
        yield weight
        yield phase
        yield starved
        yield progress
        yield finding
        yield p_value

    def _upstreams(self) -> Iterator[Metric]:
        """Each pool's servers: in rotation or not, ejections; its retries by reason."""
        healthy = GaugeMetricFamily(
            "ringproxy_upstream_server_healthy", "1 while the server is in its pool's "
            "rotation (not ejected by outlier detection, not failing its health checks).",
            labels=("pool", "server"))
        ejections = CounterMetricFamily(
            "ringproxy_upstream_ejections", "Outlier ejections of the server.",
            labels=("pool", "server"))
        retries = CounterMetricFamily(
            "ringproxy_upstream_retries", "Retries made on another server of the pool, by "
            "what failed.", labels=("pool", "reason"))
        view = self.upstream_view
        for pool in self._pools:
            name = pool.config.name
            for server in pool.health.state.servers:
                available, ejected = server.available, server.ejections_total
                if view is not None:
                    available = available and view.available(name, server.url)
                    ejected += view.ejections(name, server.url)
                healthy.add_metric((name, server.url), float(available))
                ejections.add_metric((name, server.url), ejected)
            if pool.config.retries is not None:
                for reason in RETRY_REASONS:
                    retries.add_metric((name, reason), pool.retried.get(reason, 0))
        yield healthy
        yield ejections
        yield retries

    def _config_and_rollbacks(self) -> Iterator[Metric]:
        rollbacks = CounterMetricFamily(
            "ringproxy_rollbacks", "Rings moved back by analysis or an operator, by reason.",
            labels=("route", "ring", "reason"))
        # Every ring the rollout loop runs has its series from the start (at 0), so that
        # increase() sees the first rollback: "manual" and each check of its last verdict.
        counts: dict[tuple[str, str, str], int] = {}
        for ring in self._rings:
            if ring.phase is not None:
                checks = ring.verdict.checks if ring.verdict is not None else ()
                for reason in ("manual", *(c.name for c in checks)):
                    counts[ring.route, ring.name, reason] = 0
        counts.update(self._rollbacks)
        for (route, ring_name, reason), n in counts.items():
            rollbacks.add_metric((route, ring_name, reason), n)
        yield rollbacks
        if self._revision:
            yield InfoMetricFamily(
                "ringproxy_config", "The config revision being served.",
                value={"revision": self._revision})
        yield GaugeMetricFamily(
            "ringproxy_config_last_reload_success", "1 if the last config load or reload "
            "succeeded, 0 if it was rejected.", value=self._reload_ok)
        yield GaugeMetricFamily(
            "ringproxy_config_last_reload_success_timestamp_seconds", "Unix time of the last "
            "successful config load or reload.", value=self._reload_time)
        reloads = CounterMetricFamily(
            "ringproxy_config_reloads", "Config reloads by result (the initial load excluded).",
            labels=("result",))
        for result, n in zip(RELOAD_RESULTS, self._reloads, strict=True):
            reloads.add_metric((result,), n)
        yield reloads

    def __repr__(self) -> str:
        return f"<Metrics rings={len(self._recorders)} revision={self._revision or '-'}>"
