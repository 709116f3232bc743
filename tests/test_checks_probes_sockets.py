"""External checks' robustness on real sockets: a ring's health check speaks its pool's
TLS (private CA, client certificate, server name), a Prometheus answer that is broken
(not UTF-8, a number no float holds, megabytes long) is ``no_data`` and never leaves an
older pass in place, a resumed ring counts its health failures from zero, and a renewed
client certificate at the same path is presented after a reload.

Every server is a real aiohttp server on 127.0.0.1; intervals are fractions of a second
and every wait has a generous bound.
"""

from __future__ import annotations

import json
import ssl
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.checks.probes import MAX_ANSWER, query_prometheus
from proxy.checks.results import Status
from proxy.config import parse_config
from proxy.config.checks import ExternalCheck, PrometheusQuery
from proxy.rollout.machine import Phase, Trigger
from proxy.server import Proxy
from tests.conftest import ProxyFactory, Upstream, serve_app
from tests.test_checks_sockets import Hooks
from tests.test_limits_config import self_signed
from tests.test_rollback_sockets import events_of, wait_for
from tests.test_upstream_tls_sockets import TLSUpstream


class MutualTLS(TLSUpstream):
    """An https server that demands a client certificate from ``client_cas``; it records
    the common name of each client certificate it is shown."""

    def __init__(self, cert: Path, key: Path, *client_cas: Path) -> None:
        super().__init__(cert, key)
        self.context.verify_mode = ssl.CERT_REQUIRED
        for ca in client_cas:
            self.context.load_verify_locations(ca)
        self.peers: list[str] = []

    async def any(self, request: web.Request) -> web.Response:
        cert: Any = request.transport.get_extra_info("peercert") if request.transport else None
        subject = dict(x[0] for x in cert["subject"]) if cert else {}
        self.peers.append(str(subject.get("commonName", "")))
        return await super().any(request)


def analysed_route(canary_pool: str, health: str) -> str:
    """Pools ``stable`` (plain) and ``canary`` (``canary_pool``'s lines), one analysed ring
    on ``canary`` with ``health`` as its health checks."""
    return textwrap.dedent(f"""\
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        pools:
          stable: {{servers: ["@STABLE@"]}}
          canary:
            @CANARY@
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            analysis: {{interval: 200ms}}
            rings:
              - name: canary
                pool: canary
                progression: {{steps: [20, 50], min_step_duration: 1h}}
                health_checks: [{health}]
              - name: stable
                pool: stable
        """).replace("@CANARY@", canary_pool)


# --------------------------------------------------------------------------- TLS


@pytest.mark.timeout(60)
async def test_a_ring_health_check_uses_its_pools_ca_client_certificate_and_server_name(
    tmp_path: Path, make_proxy: ProxyFactory, stable: Upstream,
) -> None:
    server_cert, server_key = self_signed(tmp_path / "server", "server", cn="api.internal")
    client_cert, client_key = self_signed(tmp_path / "client", "client", cn="ringproxy-edge")
    upstream = MutualTLS(server_cert, server_key, client_cert)
    await upstream.start()
    try:
        pool = (f'servers: ["{upstream.url}"]\n    tls: {{ca: "{server_cert}", '
                f'cert: "{client_cert}", key: "{client_key}", server_name: api.internal}}')
        text = analysed_route(pool, "{name: db, path: /health/db, interval: 300ms, "
                              "timeout: 300ms, threshold: 2}").replace("@STABLE@", stable.url)
        proxy = await make_proxy(text)
        results = proxy.controller.checks.results
        key = ("api", "canary", "db")
        await wait_for(lambda: key in results and results[key].status is Status.PASS
                       and "/health/db" in [p for p, _, _ in upstream.seen], 20, 0.05)
        # Shown the pool's client certificate, verified against the pool's CA under its
        # server_name (the address is 127.0.0.1, which the certificate's name is not).
        assert "ringproxy-edge" in upstream.peers
        await wait_for(lambda: len(upstream.seen) >= 4, 20, 0.05)  # more rounds, still fine
        assert results[key].status is Status.PASS, results[key].detail
        assert not events_of(proxy, "rollback")
        assert proxy.controller.states["api"]["canary"].phase is Phase.PROGRESSING
    finally:
        await upstream.stop()


@pytest.mark.timeout(60)
async def test_a_renewed_client_certificate_is_presented_after_a_reload(
    tmp_path: Path, stable: Upstream, client: aiohttp.ClientSession,
) -> None:
    server_cert, server_key = self_signed(tmp_path / "server", "server", cn="api.internal")
    one_cert, one_key = self_signed(tmp_path / "one", "client", cn="edge-one")
    two_cert, two_key = self_signed(tmp_path / "two", "client", cn="edge-two")
    upstream = MutualTLS(server_cert, server_key, one_cert, two_cert)
    await upstream.start()
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "client.crt", live / "client.key"
    cert.write_bytes(one_cert.read_bytes())
    key.write_bytes(one_key.read_bytes())
    text = textwrap.dedent(f"""\
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        pools:
          secure:
            servers: ["{upstream.url}"]
            tls: {{ca: "{server_cert}", cert: "{cert}", key: "{key}",
                   server_name: api.internal}}
        routes:
          - name: api
            rings: [{{name: main, pool: secure}}]
        """)
    proxy = Proxy(parse_config(text))
    await proxy.start()
    try:
        async with client.get(proxy.url + "/first") as r:
            assert r.status == 200, await r.text()
        assert upstream.peers == ["edge-one"]
        # The certificate is renewed in place (same paths), then the config is reloaded.
        cert.write_bytes(two_cert.read_bytes())
        key.write_bytes(two_key.read_bytes())
        await proxy.apply(parse_config(text))
        async with client.get(proxy.url + "/second") as r:
            assert r.status == 200, await r.text()
        assert upstream.peers[-1] == "edge-two", upstream.peers
    finally:
        await proxy.stop()
        await upstream.stop()


# --------------------------------------------------------------------------- Prometheus


class FakePrometheus:
    """Answers ``/api/v1/query`` with ``body`` (bytes, as they are)."""

    def __init__(self) -> None:
        self.body = b""
        self.queries = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def query(self, request: web.Request) -> web.Response:
        self.queries += 1
        return web.Response(body=self.body, content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/query", self.query)
        self._runner, self.url = await serve_app(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def fake_prometheus() -> AsyncIterator[FakePrometheus]:
    prom = FakePrometheus()
    await prom.start()
    yield prom
    await prom.stop()


def scalar(value: str) -> bytes:
    return b'{"status":"success","data":{"resultType":"scalar","result":[1700000000,' + \
        value.encode() + b']}}'


GOOD = scalar('"0.9"')
NOT_UTF8 = b'{"status":"success","data":{"resultType":"scalar","result":[1,"0.9"]},' \
    b'"warnings":["\xff\xfe bad bytes"]}'
HUGE_NUMBER = scalar("1" + "0" * 400)
# A valid one-number answer, padded past the limit: never parsed.
TOO_LARGE = GOOD[:-1] + b',"pad":"' + b"x" * (MAX_ANSWER + 10) + b'"}'


async def test_broken_prometheus_answers_are_no_data_with_their_reason(
    fake_prometheus: FakePrometheus,
) -> None:
    check = ExternalCheck("conv", PrometheusQuery(fake_prometheus.url, "up"), min=0.5)
    async with aiohttp.ClientSession() as session:
        fake_prometheus.body = GOOD
        good = await query_prometheus(session, check, "up", 1.0)
        assert (good.status, good.value) == (Status.PASS, 0.9)

        fake_prometheus.body = NOT_UTF8  # decoded with replacement characters: still read
        lenient = await query_prometheus(session, check, "up", 2.0)
        assert (lenient.status, lenient.value) == (Status.PASS, 0.9)

        fake_prometheus.body = NOT_UTF8.replace(b'"0.9"', b'"\xff0.9"')
        bad_bytes = await query_prometheus(session, check, "up", 3.0)
        assert bad_bytes.status is Status.NO_DATA and "not a number" in bad_bytes.detail

        fake_prometheus.body = HUGE_NUMBER
        huge = await query_prometheus(session, check, "up", 4.0)
        assert huge.status is Status.NO_DATA and "not a number" in huge.detail
        assert len(huge.detail) < 100  # the 400 digits are not repeated

        fake_prometheus.body = TOO_LARGE
        large = await query_prometheus(session, check, "up", 5.0)
        assert large.status is Status.NO_DATA and "answer too large" in large.detail
    assert fake_prometheus.queries == 5


@pytest.mark.timeout(60)
async def test_a_prometheus_check_that_breaks_loses_its_old_pass(
    fake_prometheus: FakePrometheus, make_proxy: ProxyFactory, stable: Upstream,
    canary: Upstream,
) -> None:
    check = (f'{{name: conv, min: 0.5, interval: 100ms, prometheus: '
             f'{{url: "{fake_prometheus.url}", query: up, timeout: 2s}}}}')
    text = textwrap.dedent(f"""\
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        pools:
          stable: {{servers: ["{stable.url}"]}}
          canary: {{servers: ["{canary.url}"]}}
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            analysis:
              interval: 200ms
              checks: [{check}]
            rings:
              - {{name: canary, pool: canary,
                  progression: {{steps: [20, 50], min_step_duration: 1h}}}}
              - {{name: stable, pool: stable}}
        """)
    fake_prometheus.body = GOOD
    proxy = await make_proxy(text)
    results = proxy.controller.checks.results
    key = ("api", "canary", "conv")
    await wait_for(lambda: key in results and results[key].status is Status.PASS, 20, 0.05)
    for body, reason in ((b'{"status":"success","data":{"resultType":"scalar","result":'
                          b'[1,"\xff"]}}', "not a number"),
                         (HUGE_NUMBER, "not a number"), (TOO_LARGE, "answer too large")):
        fake_prometheus.body = body
        await wait_for(lambda: results[key].status is Status.NO_DATA, 20, 0.05)
        assert reason in results[key].detail, results[key].detail
        fake_prometheus.body = GOOD
        await wait_for(lambda: results[key].status is Status.PASS, 20, 0.05)
    body, _ = proxy.metrics.exposition()
    assert b'ringproxy_external_checks_total{check="conv",ring="canary",route="api",' \
        b'status="no_data"}' in body


# --------------------------------------------------------------------------- resume


class FlakyHealth:
    """A plain upstream whose health path fails ``fail_next`` more times (or forever with
    ``fail_next < 0``), then passes; every probe is counted."""

    def __init__(self) -> None:
        self.fail_next = -1
        self.probes = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def health(self, request: web.Request) -> web.Response:
        self.probes += 1
        if self.fail_next:
            self.fail_next -= 1 if self.fail_next > 0 else 0
            return web.Response(status=503, text="down")
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self.health)
        self._runner, self.url = await serve_app(app)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.mark.timeout(60)
async def test_a_resumed_ring_counts_its_health_failures_from_zero(
    make_proxy: ProxyFactory, stable: Upstream,
) -> None:
    flaky = FlakyHealth()
    await flaky.start()
    try:
        text = analysed_route(f'servers: ["{flaky.url}"]', "{name: db, path: /health, "
                              "interval: 150ms, timeout: 150ms, threshold: 3}")
        proxy = await make_proxy(text.replace("@STABLE@", stable.url))
        await wait_for(lambda: bool(events_of(proxy, "rollback")), 20, 0.05)
        assert "(3 in a row)" in events_of(proxy, "rollback")[0].reason
        # Rolled back, probes of the ring stop; one more failure, then health for good.
        flaky.fail_next = 1
        await proxy.controller.act("api", "canary", Trigger.RESUME, "fixed")
        assert proxy.controller.states["api"]["canary"].phase is Phase.PROGRESSING
        before = flaky.probes
        await wait_for(lambda: flaky.probes >= before + 6, 20, 0.05)
        results = proxy.controller.checks.results
        await wait_for(lambda: results[("api", "canary", "db")].status is Status.PASS, 20,
                       0.05)
        # One failure after the resume is one in a row, not the fourth.
        assert len(events_of(proxy, "rollback")) == 1, [
            e.reason for e in events_of(proxy, "rollback")]
        assert proxy.controller.states["api"]["canary"].phase is Phase.PROGRESSING
    finally:
        await flaky.stop()


def test_prometheus_bodies_used_here_are_what_they_claim() -> None:
    """The fixtures of the tests above: a body that is not UTF-8, one whose number no float
    holds, one over the limit that would otherwise be a valid pass."""
    with pytest.raises(UnicodeDecodeError):
        NOT_UTF8.decode()
    with pytest.raises(OverflowError):
        float(json.loads(HUGE_NUMBER)["data"]["result"][1])
    assert len(TOO_LARGE) > MAX_ANSWER and json.loads(TOO_LARGE)["status"] == "success"


@pytest.mark.timeout(60)
async def test_a_check_whose_run_raises_has_no_data_not_its_old_pass(
    make_proxy: ProxyFactory, stable: Upstream, canary: Upstream,
) -> None:
    hooks = Hooks()
    await hooks.start()
    hooks.status = 200
    try:
        check = f'{{name: smoke, interval: 100ms, webhook: {{url: "{hooks.url}/smoke"}}}}'
        text = textwrap.dedent(f"""\
            listen: 127.0.0.1:0
            admin: {{listen: 127.0.0.1:0}}
            access_log: {{enabled: false}}
            pools:
              stable: {{servers: ["{stable.url}"]}}
              canary: {{servers: ["{canary.url}"]}}
            routes:
              - name: api
                sticky: {{key: ["header:X-User-Id"]}}
                analysis: {{interval: 200ms, checks: [{check}]}}
                rings:
                  - {{name: canary, pool: canary,
                      progression: {{steps: [20, 50], min_step_duration: 1h}}}}
                  - {{name: stable, pool: stable}}
            """)
        proxy = await make_proxy(text)
        runner = proxy.controller.checks
        key = ("api", "canary", "smoke")
        await wait_for(lambda: key in runner.results
                       and runner.results[key].status is Status.PASS, 20, 0.05)
        working = runner.snapshot

        def broken(route: str, ring: str) -> dict[str, object]:
            raise ZeroDivisionError("a bug while building the body")

        runner.snapshot = broken  # a fault in the run itself, not in the hook
        await wait_for(lambda: runner.results[key].status is Status.NO_DATA, 20, 0.05)
        assert runner.results[key].detail == "the check failed (ZeroDivisionError)"
        runner.snapshot = working
        await wait_for(lambda: runner.results[key].status is Status.PASS, 20, 0.05)
    finally:
        await hooks.stop()
