"""Per-pool credentials on real sockets: each pool's upstream gets its own credential and
never another's (a canary never sees production's), a client cannot inject or override
one (retries included), mTLS to an upstream that demands a client certificate works and
fails plainly without it, and no admin surface of a running ``ringproxy`` process (the
API, the status page, explain/check/status CLIs, the process and access logs, events and
the audit file) ever shows a credential."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import ssl
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import ProxyFactory, Upstream, cli, headers_of
from tests.test_limits_config import self_signed
from tests.test_rollback_sockets import wait_for
from tests.test_upstream_tls_sockets import TLSUpstream

PROD = "prod-cred-5c1d0e8f2a7b4411"
STAGE = "stage-cred-9e2b7a3c6d1f0822"
ADMIN = "cred-admin-token-0123456789abcdef"
SECRETS = (PROD, STAGE)


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CR_PROD", PROD)
    monkeypatch.setenv("CR_STAGE", STAGE)
    monkeypatch.setenv("CR_ADMIN", ADMIN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pools(stable: str, canary: str, prod_extra: str = "") -> str:
    return textwrap.dedent(f"""\
        pools:
          prod:
            environment: production
            servers: [{stable}]
            auth: {{header: Authorization, value: "Bearer ${{CR_PROD}}"}}@EXTRA@
          canary:
            environment: staging
            servers: ["{canary}"]
            auth:
              - {{header: Authorization, value: "Bearer ${{CR_STAGE}}"}}
              - {{header: X-Env, value: "staging-${{CR_STAGE}}"}}
        """).replace("@EXTRA@", prod_extra)


ROUTES = textwrap.dedent("""\
    routes:
      - name: api
        sticky: {key: ["header:X-User-Id"]}
        analysis: {interval: 500ms}
        rings:
          - name: canary
            pool: canary
            rules: [{attr: "header:X-Beta", exists: true}]
          - name: main
            pool: prod
    """)


def no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{where} shows a credential"
    # Nor a recognisable part of one.
    assert "5c1d0e8f" not in text and "9e2b7a3c" not in text, where


async def test_each_pool_gets_its_own_credential_and_clients_cannot_inject_one(
    secrets: None, make_proxy: ProxyFactory, stable: Upstream, canary: Upstream,
    client: aiohttp.ClientSession,
) -> None:
    text = ("listen: 127.0.0.1:0\nadmin: {listen: 127.0.0.1:0}\naccess_log: {enabled: false}\n"
            + pools(f'"{stable.url}"', canary.url) + ROUTES)
    proxy = await make_proxy(text)
    injected = [("Authorization", "Bearer injected"), ("authorization", "Bearer lower"),
                ("X-ENV", "production"), ("X-User-Id", "u1")]
    for beta in (True, False, True, False):
        headers = [*injected, *([("X-Beta", "1")] if beta else [])]
        async with client.get(proxy.url + "/echo", headers=headers) as r:
            assert r.status == 200
            await r.read()
    assert len(canary.requests) == 2 and len(stable.requests) == 2
    for seen in canary.requests:
        raw = json.dumps(seen)
        assert PROD not in raw, "the canary upstream got the production credential"
        names = [k.lower() for k, _ in seen["headers"]]
        assert names.count("authorization") == 1 and names.count("x-env") == 1
        got = headers_of(seen)
        assert got["authorization"] == f"Bearer {STAGE}"
        assert got["x-env"] == f"staging-{STAGE}"
        assert "injected" not in raw and "Bearer lower" not in raw
    for seen in stable.requests:
        names = [k.lower() for k, _ in seen["headers"]]
        assert names.count("authorization") == 1
        assert headers_of(seen)["authorization"] == f"Bearer {PROD}"
        assert STAGE not in json.dumps(seen)
        # X-Env is the canary pool's header: the client's goes to prod as it came.
        assert headers_of(seen)["x-env"] == "production"


async def test_a_retried_request_carries_the_credential_once(
    secrets: None, make_proxy: ProxyFactory, stable: Upstream, canary: Upstream,
    client: aiohttp.ClientSession,
) -> None:
    # prod: a server that refuses connections first, then the live one; every request that
    # hits the dead one is retried on the live one (with the head rebuilt: preserve_host off).
    dead = f"http://127.0.0.1:{free_port()}"
    extra = "\n    retries: {attempts: 1, min_retries: 100}\n    preserve_host: false"
    text = ("listen: 127.0.0.1:0\nadmin: {listen: 127.0.0.1:0}\naccess_log: {enabled: false}\n"
            + pools(f'"{dead}", "{stable.url}"', canary.url, extra) + ROUTES)
    proxy = await make_proxy(text)
    for _ in range(6):
        async with client.get(proxy.url + "/echo",
                              headers={"Authorization": "Bearer injected"}) as r:
            assert r.status == 200
            await r.read()
    assert sum(proxy.runtime.pools["prod"].retried.values()) >= 2
    assert len(stable.requests) == 6
    for seen in stable.requests:
        assert [k.lower() for k, _ in seen["headers"]].count("authorization") == 1
        assert headers_of(seen)["authorization"] == f"Bearer {PROD}"


# --------------------------------------------------------------------------- mTLS


class MutualTLSUpstream(TLSUpstream):
    """An https upstream that demands a client certificate signed by ``client_ca``."""

    def __init__(self, cert: Path, key: Path, client_ca: Path) -> None:
        super().__init__(cert, key)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(client_ca)
        self.peers: list[str] = []

    async def any(self, request: web.Request) -> web.Response:
        cert: Any = request.transport.get_extra_info("peercert") if request.transport else None
        subject = dict(x[0] for x in cert["subject"]) if cert else {}
        self.peers.append(str(subject.get("commonName", "")))
        return await super().any(request)


@pytest.fixture
async def mtls(tmp_path: Path) -> AsyncIterator[tuple[MutualTLSUpstream, Path, Path, Path]]:
    server_cert, server_key = self_signed(tmp_path / "server", "server", cn="api.internal")
    client_cert, client_key = self_signed(tmp_path / "client", "client", cn="ringproxy-edge")
    upstream = MutualTLSUpstream(server_cert, server_key, client_cert)
    await upstream.start()
    yield upstream, server_cert, client_cert, client_key
    await upstream.stop()


async def test_mtls_to_an_upstream_that_requires_a_client_certificate(
    mtls: tuple[MutualTLSUpstream, Path, Path, Path], make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
) -> None:
    upstream, ca, cert, key = mtls
    text = textwrap.dedent(f"""\
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        pools:
          with_cert:
            servers: ["{upstream.url}"]
            tls: {{ca: "{ca}", cert: "{cert}", key: "{key}", server_name: api.internal}}
          no_cert:
            servers: ["{upstream.url}"]
            tls: {{ca: "{ca}"}}
          wrong_name:
            servers: ["{upstream.url}"]
            tls: {{ca: "{ca}", cert: "{cert}", key: "{key}", server_name: other.internal}}
        routes:
          - name: api
            rings:
              - {{name: nocert, pool: no_cert, rules: [{{attr: "header:X-Ring", equals: a}}]}}
              - {{name: badname, pool: wrong_name,
                  rules: [{{attr: "header:X-Ring", equals: b}}]}}
              - {{name: main, pool: with_cert}}
        """)
    proxy = await make_proxy(text)
    for _ in range(3):  # the TLS connection is pooled and reused
        async with client.get(proxy.url + "/hello") as r:
            assert r.status == 200, await r.text()
            assert await r.text() == "tls /hello 0"
    assert upstream.peers == ["ringproxy-edge"] * 3
    assert len({conn for _, _, conn in upstream.seen}) == 1
    # Without the client certificate the upstream refuses the handshake: a 502, and the
    # upstream never sees the request.  A name the certificate does not hold: the same.
    for ring in ("a", "b"):
        async with client.get(proxy.url + "/secret", headers={"X-Ring": ring}) as r:
            assert r.status == 502, (ring, await r.text())
    assert [path for path, _, _ in upstream.seen] == ["/hello"] * 3


# --------------------------------------------------------------------------- every surface


async def _drain(stream: asyncio.StreamReader | None, into: list[bytes]) -> None:
    assert stream is not None
    while chunk := await stream.read(65536):
        into.append(chunk)


async def test_no_admin_surface_ever_shows_a_credential(
    secrets: None, spawn: Any, stable: Upstream, canary: Upstream, tmp_path: Path,
) -> None:
    path = tmp_path / "ringproxy.yaml"
    good = textwrap.dedent(f"""\
        # credentials come from the environment
        listen: 127.0.0.1:0
        admin:
          listen: 127.0.0.1:0
          tokens: [{{env: CR_ADMIN, role: admin}}]
        access_log: {{enabled: true, path: "-"}}
        shutdown_grace: 2s
        drain_delay: 0s
        state: {{path: "{tmp_path / 'state.json'}", audit: "{tmp_path / 'audit.jsonl'}"}}
        """) + pools(f'"{stable.url}"', canary.url) + ROUTES
    path.write_text(good)
    running = await spawn("--log-level", "debug", "run", "--config", str(path))
    await running.wait_listening()
    m = await running.wait_listening(re.compile(rb"admin listening on (http://\S+)"))
    admin = m.group(1).decode()
    out: list[bytes] = []
    err: list[bytes] = [running.stderr]
    drains = [asyncio.ensure_future(_drain(running.proc.stdout, out)),
              asyncio.ensure_future(_drain(running.proc.stderr, err))]
    auth = {"Authorization": f"Bearer {ADMIN}"}
    shown: dict[str, str] = {}
    try:
        async with aiohttp.ClientSession() as http:
            # Traffic: both rings, with a client trying its own credential.
            for beta in ("1", None):
                headers = {"X-User-Id": "u7", "Authorization": "Bearer mine"}
                if beta:
                    headers["X-Beta"] = beta
                async with http.get(running.url + "/echo", headers=headers) as r:
                    assert r.status == 200
                    await r.read()  # (the echo upstream's body shows what it got)
                    shown[f"response headers {beta}"] = str(r.headers)
            # A Rings API write (audited with its diff) and a rollout action (an event).
            async with http.patch(admin + "/api/pools/canary", headers=auth,
                                  json={"connect_timeout": "3s"}) as r:
                shown["PATCH /api/pools/canary"] = await r.text()
                assert r.status == 200, shown["PATCH /api/pools/canary"]
            async with http.post(admin + "/api/routes/api/rings/canary/rollback",
                                 headers=auth, json={"reason": "test"}) as r:
                shown["rollback"] = await r.text()
            # A reload the isolation check refuses (the canary pool asks for CR_PROD).
            path.write_text(path.read_text().replace("Bearer ${CR_STAGE}",
                                                     "Bearer ${CR_PROD}"))
            async with http.post(admin + "/api/reload", headers=auth) as r:
                shown["refused reload"] = await r.text()
                assert r.status == 422, shown["refused reload"]
                assert "CR_PROD is a credential of production pool prod" in \
                    shown["refused reload"]
            path.write_text(good)
            async with http.post(admin + "/api/reload", headers=auth) as r:
                assert r.status == 200, await r.text()
            for url in ("/", "/metrics", "/api/routes", "/api/routes/api",
                        "/api/routes/api/series", "/api/events",
                        "/api/explain?route=api&header=X-Beta:1",
                        "/api/routes/api/rings", "/api/routes/api/rings/canary",
                        "/api/routes/api/rings/main", "/api/pools", "/api/pools/prod",
                        "/api/pools/canary"):
                async with http.get(admin + url, headers=auth) as r:
                    assert r.status == 200, (url, r.status)
                    shown[url] = await r.text()
        # The pool views say there is a credential, redacted.
        pool = json.loads(shown["/api/pools/prod"])["pool"]
        assert pool["status"]["credentials"] == [
            {"header": "Authorization", "value": "***", "variables": ["CR_PROD"],
             "shared": False}]
        assert pool["status"]["environment"] == "production"
        assert pool["spec"]["auth"]["value"] == "Bearer ${CR_PROD}"  # the file's text
        env = {"RINGPROXY_ADMIN_URL": admin, "RINGPROXY_ADMIN_TOKEN": ADMIN}
        commands = [
            ("explain", "--config", str(path), "--route", "api", "--header", "X-Beta=1"),
            ("check", str(path)), ("check", "--format", "json", str(path)),
            ("status",), ("events",), ("pools", "get", "prod", "--json"),
            ("rings", "list", "api", "--json"),
        ]
        with contextlib.ExitStack() as stack:
            mp = stack.enter_context(pytest.MonkeyPatch.context())
            for k, v in env.items():
                mp.setenv(k, v)
            for command in commands:
                done = await asyncio.to_thread(cli, *command)
                assert done.returncode == 0, (command, done.stderr)
                shown[" ".join(command)] = done.stdout + done.stderr
    finally:
        running.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await running.proc.wait()
            await asyncio.gather(*drains)
    shown["access log (stdout)"] = b"".join(out).decode()
    shown["process log (stderr)"] = b"".join(err).decode()
    shown["audit file"] = (tmp_path / "audit.jsonl").read_text()
    shown["state file"] = (tmp_path / "state.json").read_text()
    for where, text in shown.items():
        no_secret(where, text)
    # The surfaces were there to look at: not empty, and about these requests.
    assert shown["access log (stdout)"].count('"route": "api"') + \
        shown["access log (stdout)"].count('"route":"api"') >= 2
    assert "CR_PROD is a credential of production pool prod" in shown["process log (stderr)"]
    assert '"diff"' in shown["audit file"] and "connect_timeout" in shown["audit file"]
    assert "canary" in shown["explain --config " + str(path) + " --route api --header X-Beta=1"]
    # And the upstreams got what they should.
    assert headers_of(canary.requests[0])["authorization"] == f"Bearer {STAGE}"
    assert headers_of(stable.requests[0])["authorization"] == f"Bearer {PROD}"


async def test_active_health_checks_use_the_pools_tls_and_client_certificate(
    mtls: tuple[MutualTLSUpstream, Path, Path, Path], make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
) -> None:
    upstream, ca, cert, key = mtls
    check = "health: {path: /healthz, interval: 200ms, timeout: 200ms, unhealthy_threshold: 1}"
    text = textwrap.dedent(f"""\
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        pools:
          with_cert:
            servers: ["{upstream.url}"]
            tls: {{ca: "{ca}", cert: "{cert}", key: "{key}", server_name: api.internal}}
            {check}
          no_cert:
            servers: ["{upstream.url}"]
            tls: {{ca: "{ca}", server_name: api.internal}}
            {check}
          wrong_name:
            servers: ["{upstream.url}"]
            tls: {{ca: "{ca}", cert: "{cert}", key: "{key}", server_name: other.internal}}
            {check}
        routes:
          - name: api
            rings:
              - {{name: nocert, pool: no_cert, rules: [{{attr: "header:X-Ring", equals: a}}]}}
              - {{name: badname, pool: wrong_name,
                  rules: [{{attr: "header:X-Ring", equals: b}}]}}
              - {{name: main, pool: with_cert}}
        """)
    proxy = await make_proxy(text)
    pools = proxy.runtime.pools
    await wait_for(lambda: upstream.peers.count("ringproxy-edge") >= 3
                   and pools["no_cert"].health.down and pools["wrong_name"].health.down, 10)
    assert {path for path, _, _ in upstream.seen} == {"/healthz"}
    assert not pools["with_cert"].health.down  # (its checks name api.internal: verified)
    async with client.get(proxy.url + "/x") as r:
        assert r.status == 200
    async with client.get(proxy.url + "/x", headers={"X-Ring": "a"}) as r:
        assert r.status == 503  # the pool's checks fail without a certificate: out of rotation
        assert "no healthy server in pool no_cert" in await r.text()


async def test_a_credential_headers_underscore_twin_is_dropped_when_underscores_are_let_in(
    secrets: None, make_proxy: ProxyFactory, stable: Upstream,
    client: aiohttp.ClientSession,
) -> None:
    text = textwrap.dedent(f"""\
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        limits: {{underscores_in_headers: true}}
        pools:
          prod:
            servers: ["{stable.url}"]
            auth: {{header: X-Api-Key, value: "${{CR_PROD}}"}}
        routes:
          - name: api
            rings: [{{name: main, pool: prod}}]
        """)
    proxy = await make_proxy(text)
    # A CGI-style backend reads X_Api_Key and X-Api-Key as one (HTTP_X_API_KEY).
    async with client.get(proxy.url + "/echo", headers=[
            ("X_Api_Key", "injected"), ("x_api-KEY", "mixed"), ("X_Other_Thing", "kept")]) as r:
        assert r.status == 200
        await r.read()
    (seen,) = stable.requests
    names = [k.lower() for k, _ in seen["headers"]]
    assert "x_api_key" not in names and "x_api-key" not in names
    assert names.count("x-api-key") == 1 and headers_of(seen)["x-api-key"] == PROD
    assert headers_of(seen)["x_other_thing"] == "kept"  # underscores are let in otherwise
    assert "injected" not in json.dumps(seen) and "mixed" not in json.dumps(seen)
