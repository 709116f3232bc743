"""Per-ring metrics: Prometheus exposition and the in-process sliding windows.

The one module that imports prometheus_client.  Per request the handler calls
``RingRecorder.record`` (through ``RingRuntime.recorder``), which adds to plain integers
and a :class:`~proxy.rollout.window.RingWindow`: no label lookup, no lock, no prometheus_client
call.  Everything runs on the event loop thread, so a scrape (also on that thread) reads
a consistent snapshot.  At scrape time :meth:`Metrics.collect` turns the recorders, and
the live runtime state (in-flight, weights, phases), into metric families; a ring that
left the config is simply no longer collected, so its series disappear.

Label values come only from config names (route, ring, pool) and the fixed sets below.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

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

from proxy.dataplane.handler import INTERNAL
from proxy.rollout.window import LATENCY_BUCKETS, RingWindow, Summary
from proxy.runtime import RingRuntime, Runtime

# code_class: the status class sent to the client; "error" when the proxy answered
# itself because the upstream failed (502/504) or the ring was full (503); "client_closed"
# when the client went away before any response was sent; "internal" when a defect of the
# proxy failed the request (a 500 or a cut response, logged with its traceback).
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "error", "client_closed", "internal")
ERROR_KINDS = ("connect", "timeout", "reset", "bad_response", "overload")
DIRECTIONS = ("sent", "received")  # request body bytes sent upstream / response body received
RELOAD_RESULTS = ("success", "failure")

_5XX, _ERROR, _CLIENT_CLOSED, _INTERNAL = 4, 5, 6, 7
# status // 100 -> index into CODE_CLASSES.  0 (nothing sent) is an error; the
# non-standard 600-999 that aiohttp's parser accepts count as 5xx.
_CLASS_OF = (_ERROR, 0, 1, 2, 3, 4, 4, 4, 4, 4)
_KIND_INDEX = {kind: i for i, kind in enumerate(ERROR_KINDS)}
_LOCAL_STATUS = frozenset({502, 503, 504})  # what the proxy answers for an UpstreamError
_LE = (*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf")  # "0.001" ... "10.0", as Go writes them

RING_LABELS = ("route", "ring", "pool")


class RingRecorder:
    """One ring's counters and window.  ``RingRuntime.recorder`` points here."""

    __slots__ = (
        "buckets",
        "duration_sum",
        "labels",
        "received",
        "requests",
        "ring",
        "route",
        "sent",
        "upstream_errors",
        "window",
    )

    def __init__(self, route: str, ring: str, pool: str, window: RingWindow) -> None:
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
        if error:
            kind = _KIND_INDEX.get(error)
            if kind is not None:
                self.upstream_errors[kind] += 1
                # The proxy's own 502/503/504 (status 0: nothing could be sent).  An
                # upstream failure after the upstream's headers went out keeps the
                # upstream's status class (the client saw that status line).
                cls = _ERROR if status in _LOCAL_STATUS else _CLASS_OF[status // 100]
            elif error == INTERNAL:
                # A defect of the proxy says nothing about the ring's version: counted to
                # be seen, kept out of the latencies and of the window the judge reads.
                self.requests[_INTERNAL] += 1
                self.sent += bytes_in
                self.received += bytes_out
                return
            elif status == 0 and error == "client_closed":
                cls = _CLIENT_CLOSED
            else:
                cls = _CLASS_OF[status // 100]
        else:
            cls = _CLASS_OF[status // 100]
        self.requests[cls] += 1
        self.sent += bytes_in
        self.received += bytes_out
        failed = cls in (_5XX, _ERROR)
        if status == 101:
            # An upgraded WebSocket finishes when the session ends: not a latency.
            self.window.record(now, None, failed)
            return
        self.buckets[bisect_left(LATENCY_BUCKETS, duration)] += 1
        self.duration_sum += duration
        self.window.record(now, duration, failed)

    def __repr__(self) -> str:
        return (f"<RingRecorder {self.route}/{self.ring} pool={self.labels[2]} "
                f"requests={sum(self.requests)}>")


class Metrics:
    """A proxy's metrics: its own registry, the ring recorders, config and reload state.

    ``attach(runtime)`` after building a Runtime (at start and on every reload, before the
    handler sees it): rings whose (route, ring, pool) survive keep their recorder, so
    counters and windows carry on; the others start at zero; rings that left stop being
    collected.  With ``metrics.enabled: false`` no recorder is attached and no per-ring
    series are exported.
    """

    def __init__(
        self,
        window_horizon: float = 300.0,
        window_resolution: float = 1.0,
        process_metrics: bool = True,
    ) -> None:
        RingWindow(window_horizon, window_resolution)  # validate the arguments now
        self.window_horizon = window_horizon
        self.window_resolution = window_resolution
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        if process_metrics:
            ProcessCollector(registry=self.registry)
        self._recorders: dict[tuple[str, str, str], RingRecorder] = {}
        self._by_ring: dict[tuple[str, str], RingRecorder] = {}
        self._rings: tuple[RingRuntime, ...] = ()
        self._rollbacks: dict[tuple[str, str, str], int] = {}
        self._revision = ""
        self._reload_ok = 1.0
        self._reload_time = 0.0
        self._reloads = [0] * len(RELOAD_RESULTS)

    # ------------------------------------------------------------------ wiring

    def attach(self, runtime: Runtime) -> None:
        """Give every ring of ``runtime`` its recorder (or none, when metrics are off)."""
        rings = tuple(r for route_rings in runtime.rings.values() for r in route_rings)
        if not runtime.config.metrics.enabled:
            for ring in rings:
                ring.recorder = None
            self._recorders, self._by_ring, self._rings = {}, {}, ()
            self._rollbacks.clear()
            return
        recorders: dict[tuple[str, str, str], RingRecorder] = {}
        for ring in rings:
            key = (ring.route, ring.name, ring.pool.config.name)
            recorder = self._recorders.get(key)
            if recorder is None:
                window = RingWindow(self.window_horizon, self.window_resolution)
                recorder = RingRecorder(*key, window)
            recorders[key] = recorder
            ring.recorder = recorder
        self._recorders = recorders
        self._by_ring = {(r.route, r.ring): r for r in recorders.values()}
        self._rings = rings
        self._rollbacks = {k: v for k, v in self._rollbacks.items() if k[:2] in self._by_ring}

    def window(self, route: str, ring: str, now: float, seconds: float) -> Summary:
        """The ring's last ``seconds`` (``now`` on the handler's clock, time.monotonic())."""
        try:
            recorder = self._by_ring[route, ring]
        except KeyError:
            known = ", ".join(f"{a}/{b}" for a, b in self._by_ring) or "none"
            raise KeyError(f"no metrics for ring {route}/{ring} (rings: {known})") from None
        return recorder.window.summary(now, seconds)

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
        yield from self._traffic()
        yield from self._rings_now()
        yield from self._config_and_rollbacks()

    def _traffic(self) -> Iterator[Metric]:
        """What the rings' recorders counted."""
        requests = CounterMetricFamily(
            "ringproxy_requests", "Finished requests by ring and status class sent to the "
            "client (error: the proxy answered 502/503/504 itself; client_closed: the client "
            "left before a response; internal: a defect of the proxy failed it).",
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

    def _rings_now(self) -> Iterator[Metric]:
        """The live state of each ring: in flight, weight, phase."""
        inflight = GaugeMetricFamily(
            "ringproxy_inflight_requests", "Requests (and open WebSockets) in flight on the "
            "ring.", labels=("route", "ring"))
        weight = GaugeMetricFamily(
            "ringproxy_ring_weight_percent", "Share of sticky buckets the ring owns now, in "
            "percent.", labels=("route", "ring"))
        phase = GaugeMetricFamily(
            "ringproxy_ring_phase", "1 for the ring's current rollout phase.",
            labels=("route", "ring", "phase"))
        for ring in self._rings:
            inflight.add_metric((ring.route, ring.name), ring.inflight)
            # A ring with only rules has no weight; one the rollout loop does not run
            # has no phase.
            if ring.weight is not None:
                weight.add_metric((ring.route, ring.name), float(ring.weight))
            if ring.phase is not None:
                phase.add_metric((ring.route, ring.name, str(ring.phase)), 1.0)
        yield inflight
        yield weight
        yield phase

    def _config_and_rollbacks(self) -> Iterator[Metric]:
        rollbacks = CounterMetricFamily(
            "ringproxy_rollbacks", "Rings moved back by analysis or an operator, by reason.",
            labels=("route", "ring", "reason"))
        for (route, ring_name, reason), n in self._rollbacks.items():
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
