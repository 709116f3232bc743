"""The request path over real sockets: real aiohttp upstreams, the real proxy, 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import textwrap

import aiohttp
import pytest

from proxy.server import Proxy
from tests.conftest import (
    GZIP_BODY,
    ProxyFactory,
    Upstream,
    headers_of,
    raw_exchange,
    raw_upstream,
)
from tests.test_rollback_sockets import wait_for


async def test_get_is_forwarded_to_default_ring_with_forwarding_headers(
    proxy: Proxy, stable: Upstream, client: aiohttp.ClientSession
) -> None:
    async with client.get(proxy.url + "/items/7?q=a%20b&x=1", headers={"Host": "api.test"}) as r:
        assert r.status == 200
        body = await r.json()
        assert r.headers["X-Upstream"] == "stable"
        assert r.headers["Via"] == "1.1 ringproxy"
        rid = r.headers["X-Request-Id"]
    assert len(rid) == 32
    assert body["target"] == "/items/7?q=a%20b&x=1"
    seen = headers_of(stable.requests[-1])
    assert seen["host"] == "api.test"  # preserve_host is the default
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "api.test"
    assert seen["via"] == "1.1 ringproxy"
    assert seen["x-request-id"] == rid
    assert seen["x-ring"] == "main"


async def test_header_rule_sends_request_to_the_rings_pool_with_its_headers(
    proxy: Proxy, canary: Upstream, stable: Upstream, client: aiohttp.ClientSession
) -> None:
    async with client.get(proxy.url + "/x", headers={"X-Beta": "1"}) as r:
        assert r.headers["X-Upstream"] == "canary"
    seen = headers_of(canary.requests[-1])
    assert seen["x-ring"] == "beta"
    assert seen["x-flag"] == "beta@api"
    async with client.get(proxy.url + "/x", headers={"X-Beta": "2"}) as r:
        assert r.headers["X-Upstream"] == "stable"
    assert "x-flag" not in headers_of(stable.requests[-1])


async def test_client_request_id_is_kept_and_forwarded_for_appended(
    proxy: Proxy, stable: Upstream, client: aiohttp.ClientSession
) -> None:
    headers = {"X-Request-Id": "abc-123", "X-Forwarded-For": "203.0.113.9", "Via": "1.0 edge"}
    async with client.get(proxy.url + "/", headers=headers) as r:
        assert r.headers["X-Request-Id"] == "abc-123"
    seen = headers_of(stable.requests[-1])
    assert seen["x-request-id"] == "abc-123"
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["via"] == "1.0 edge, 1.1 ringproxy"


async def test_client_cannot_choose_its_ring_header(
    proxy: Proxy, stable: Upstream, client: aiohttp.ClientSession
) -> None:
    async with client.get(proxy.url + "/", headers={"X-Ring": "beta"}) as r:
        assert r.headers["X-Upstream"] == "stable"
    assert headers_of(stable.requests[-1])["x-ring"] == "main"


async def test_upstream_request_has_no_headers_the_client_did_not_send(
    proxy: Proxy, stable: Upstream
) -> None:
    request = (
        b"POST /echo HTTP/1.1\r\nHost: h.test\r\nContent-Length: 3\r\n"
        b"Connection: close\r\n\r\nabc"
    )
    raw = await raw_exchange(proxy.url, request)
    assert raw.startswith(b"HTTP/1.1 200")
    names = {k.lower() for k, _ in stable.requests[-1]["headers"]}
    assert names == {
        "host", "content-length", "x-forwarded-for", "x-forwarded-proto",
        "x-forwarded-host", "via", "x-request-id", "x-ring",
    }


async def test_hop_by_hop_headers_are_removed_both_ways(
    proxy: Proxy, stable: Upstream
) -> None:
    request = (
        b"GET /hop HTTP/1.1\r\nHost: h.test\r\n"
        b"Connection: close, X-Secret\r\nX-Secret: s3cret\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nX-Kept: 1\r\n\r\n"
    )
    raw = await raw_exchange(proxy.url, request)
    seen = headers_of(stable.requests[-1])
    for name in ("connection", "x-secret", "keep-alive", "proxy-connection", "te", "trailer",
                 "upgrade", "proxy-authorization"):
        assert name not in seen, name
    assert seen["x-kept"] == "1"
    head = raw.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert "x-up-secret" not in head
    assert "keep-alive" not in head
    assert "proxy-authenticate" not in head
    assert "x-up-public: yes" in head


async def test_hop_by_hop_headers_in_lower_case_are_removed_too(
    proxy: Proxy, stable: Upstream
) -> None:
    request = (
        b"GET /x HTTP/1.1\r\nhost: h.test\r\nconnection: close, x-secret\r\n"
        b"x-secret: s\r\nkeep-alive: 5\r\nx-ring: forged\r\n\r\n"
    )
    raw = await raw_exchange(proxy.url, request)
    assert raw.startswith(b"HTTP/1.1 200")
    seen = headers_of(stable.requests[-1])
    assert "x-secret" not in seen and "keep-alive" not in seen and "connection" not in seen
    assert seen["x-ring"] == "main"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"http://evil.example/steal?x=1", "/steal?x=1"),
        (b"http://evil.example:9999/other/path", "/other/path"),
    ],
)
async def test_absolute_form_target_never_changes_the_upstream_server(
    proxy: Proxy, stable: Upstream, target: bytes, expected: str
) -> None:
    request = b"GET " + target + b" HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    raw = await raw_exchange(proxy.url, request)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    assert stable.requests[-1]["target"] == expected


async def test_double_slash_path_is_a_path_not_a_host(proxy: Proxy, stable: Upstream) -> None:
    raw = await raw_exchange(
        proxy.url, b"GET //evil.example/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    assert raw.startswith(b"HTTP/1.1 200")
    assert stable.requests[-1]["target"] == "//evil.example/x"


async def test_content_encoding_and_body_pass_through_byte_for_byte(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    async with client.get(proxy.url + "/gzip", headers={"Accept-Encoding": "gzip"}) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert r.headers["Content-Length"] == str(len(GZIP_BODY))
        assert await r.read() == GZIP_BODY


async def test_request_body_arrives_unchanged_with_length_and_chunked(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    payload = bytes(range(256)) * 4000 + b"tail"
    async with client.post(proxy.url + "/sink", data=payload) as r:
        got = await r.json()
    assert got == {"received": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}

    async def chunks():  # no Content-Length: sent with Transfer-Encoding: chunked
        for i in range(0, len(payload), 10_000):
            yield payload[i : i + 10_000]

    async with client.put(proxy.url + "/sink", data=chunks()) as r:
        got = await r.json()
    assert got == {"received": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


async def test_expect_100_continue(proxy: Proxy, stable: Upstream) -> None:
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /sink HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert rest.startswith(b"HTTP/1.1 200")
    assert b'"received": 5' in rest
    assert "expect" not in headers_of(stable.requests[-1])


async def test_head_204_304_carry_no_body(proxy: Proxy) -> None:
    raw = await raw_exchange(
        proxy.url, b"HEAD /sized HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 100" in head
    assert body == b""
    for code in (204, 304):
        raw = await raw_exchange(
            proxy.url,
            f"GET /status/{code} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n".encode(),
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {code}".encode())
        assert body == b""
        assert b"transfer-encoding" not in head.lower()


async def test_upstream_status_and_body_pass_through(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    async with client.get(proxy.url + "/status/503") as r:
        assert r.status == 503
        assert await r.text() == "status 503"
        assert "Retry-After" not in r.headers  # the upstream's 503, not ours


async def test_server_sent_events_are_flushed_as_they_arrive(
    proxy: Proxy, stable: Upstream, client: aiohttp.ClientSession
) -> None:
    async with client.get(proxy.url + "/sse") as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        assert first == b"data: first\n\n"
        assert not stable.sse_release.is_set()  # the upstream has not finished
        stable.sse_release.set()
        rest = await asyncio.wait_for(r.content.read(), 5)
    assert rest == b"data: second\n\n"


async def test_websocket_messages_both_ways_and_close_codes(
    proxy: Proxy, stable: Upstream, client: aiohttp.ClientSession
) -> None:
    async with client.ws_connect(proxy.url + "/ws", protocols=("chat.v1",)) as ws:
        assert ws.protocol == "chat.v1"
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "echo:hi"
        await ws.send_bytes(b"abc")
        assert (await ws.receive(timeout=5)).data == b"cba"
        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 4001
    assert headers_of(stable.requests[-1])["x-ring"] == "main"
    await asyncio.wait_for(stable.ws_closed.wait(), 5)
    stable.ws_closed.clear()

    async with client.ws_connect(proxy.url + "/ws") as ws:
        await ws.send_str("x")
        await ws.receive(timeout=5)
        await ws.close(code=4002)
    await asyncio.wait_for(stable.ws_closed.wait(), 5)
    assert stable.ws_closed_with == 4002


async def test_connect_refused_is_502(make_proxy: ProxyFactory, stable: Upstream,
                                      client: aiohttp.ClientSession) -> None:
    proxy = await make_proxy(_single_pool_config("http://127.0.0.1:1"))
    async with client.get(proxy.url + "/") as r:
        assert r.status == 502
        text = await r.text()
    assert "connect" in text
    assert "Traceback" not in text


def _single_pool_config(server: str, policy: str = "") -> str:
    return textwrap.dedent(
        f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        pools:
          only: {{servers: ["{server}"]}}
        routes:
          - name: r
            rings:
              - name: only
                pool: only
                {policy}
        """
    )


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (None, "reset"),
        (b"", "closed the connection"),
        (b"HTTP/1.1 abc bad\r\n\r\n", "malformed"),
        (b"garbage garbage\r\n\r\n", "malformed"),
    ],
)
async def test_broken_upstreams_are_502(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession, reply: bytes | None, expected: str
) -> None:
    server, url = await raw_upstream(reply)
    async with server:
        proxy = await make_proxy(_single_pool_config(url))
        async with client.get(proxy.url + "/") as r:
            assert r.status == 502
            text = await r.text()
    assert text.startswith("ringproxy: ")
    assert "Traceback" not in text


async def test_upstream_timeout_is_504(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    async with client.get(proxy.url + "/slow?s=3") as r:  # ring "main" has timeout 1s
        assert r.status == 504
        assert "timed out" in await r.text()


async def test_timeout_counts_from_the_end_of_the_request_body(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    async def slow_body():
        for _ in range(5):
            yield b"x" * 1000
            await asyncio.sleep(0.4)  # 2 s of upload at least, twice the 1 s ring timeout

    async with client.post(proxy.url + "/sink", data=slow_body()) as r:
        assert r.status == 200
        assert (await r.json())["received"] == 5000


async def test_max_concurrency_full_is_503_with_retry_after(
    make_proxy: ProxyFactory, stable: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy(_single_pool_config(stable.url, "policy: {max_concurrency: 1}"))
    ring = proxy.runtime.rings["r"][0]
    first = asyncio.ensure_future(client.get(proxy.url + "/slow?s=3"))
    await wait_for(lambda: ring.inflight == 1, 5)  # the one slot taken, for 3 s
    async with client.get(proxy.url + "/") as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "1"
        assert "concurrency" in await r.text()
    async with await first as r:
        assert r.status == 200
    async with client.get(proxy.url + "/") as r:  # the slot is free again
        assert r.status == 200


async def test_client_disconnect_releases_the_upstream(
    proxy: Proxy, stable: Upstream
) -> None:
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /hang HTTP/1.1\r\nHost: h\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(stable.hang_started.wait(), 5)
    writer.close()
    await asyncio.wait_for(stable.hang_cancelled.wait(), 5)
    ring = proxy.runtime.rings["api"][1]
    await wait_for(lambda: ring.inflight == 0, 5)


async def test_upstream_dying_mid_body_cuts_the_client_connection(
    proxy: Proxy, client: aiohttp.ClientSession
) -> None:
    async with client.get(proxy.url + "/broken") as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_no_route_is_404(make_proxy: ProxyFactory, stable: Upstream,
                               client: aiohttp.ClientSession) -> None:
    text = _single_pool_config(stable.url).replace(
        "  - name: r\n", "  - name: r\n    match: {host: api.test, path_prefix: /v1}\n"
    )
    proxy = await make_proxy(text)
    async with client.get(proxy.url + "/v1/x", headers={"Host": "api.test:8080"}) as r:
        assert r.status == 200
    async with client.get(proxy.url + "/v1x", headers={"Host": "api.test"}) as r:
        assert r.status == 404
    async with client.get(proxy.url + "/v1/x", headers={"Host": "other.test"}) as r:
        assert r.status == 404
        assert r.headers["X-Request-Id"]


async def test_preserve_host_false_sends_the_servers_host(
    make_proxy: ProxyFactory, stable: Upstream, client: aiohttp.ClientSession
) -> None:
    text = _single_pool_config(stable.url).replace(
        f'servers: ["{stable.url}"]', f'servers: ["{stable.url}"], preserve_host: false'
    )
    proxy = await make_proxy(text)
    async with client.get(proxy.url + "/", headers={"Host": "public.test"}) as r:
        assert r.status == 200
    seen = headers_of(stable.requests[-1])
    assert seen["host"] == stable.url.removeprefix("http://")
    assert seen["x-forwarded-host"] == "public.test"


@pytest.mark.parametrize("balance", ["round_robin", "least_request"])
async def test_balancing_spreads_over_the_pools_servers(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession, balance: str
) -> None:
    ups = [Upstream(f"s{i}") for i in range(3)]
    for up in ups:
        await up.start()
    try:
        servers = ", ".join(f'"{u.url}"' for u in ups)
        text = _single_pool_config(ups[0].url).replace(
            f'servers: ["{ups[0].url}"]', f"servers: [{servers}], balance: {balance}"
        )
        proxy = await make_proxy(text)
        for _ in range(9):
            async with client.get(proxy.url + "/") as r:
                assert r.status == 200
        assert [len(u.requests) for u in ups] == [3, 3, 3]
        if balance == "least_request":
            # one long request on a server steers new ones to the others
            slow = asyncio.ensure_future(client.get(proxy.url + "/slow?s=3"))

            def slow_one() -> list[Upstream]:
                return [u for u in ups if u.requests[-1]["target"].startswith("/slow")]

            await wait_for(slow_one, 5)  # arrived: in flight there for 3 s
            (busy,) = slow_one()
            before = len(busy.requests)
            for _ in range(6):
                async with client.get(proxy.url + "/") as r:
                    assert r.status == 200
            assert len(busy.requests) == before
            (await slow).release()
    finally:
        for up in ups:
            await up.stop()


async def test_access_log_writes_one_json_line_per_request(
    make_proxy: ProxyFactory, stable: Upstream, client: aiohttp.ClientSession, tmp_path
) -> None:
    log_path = tmp_path / "access.log"
    text = _single_pool_config(stable.url).replace(
        "access_log: {enabled: false}", f"access_log: {{enabled: true, path: '{log_path}'}}"
    )
    proxy = await make_proxy(text)
    async with client.post(proxy.url + "/p?secret=1", data=b"12345",
                           headers={"X-Request-Id": "rid-1"}) as r:
        assert r.status == 200
        size = len(await r.read())
    async with client.get(proxy.url + "/status/500") as r:
        assert r.status == 500
    assert proxy.access_log is not None
    proxy.access_log.flush()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first["request_id"] == "rid-1"
    assert first["method"] == "POST"
    assert first["path"] == "/p"  # the query string is not logged
    assert first["status"] == 200
    assert first["route"] == "r" and first["ring"] == "only" and first["pool"] == "only"
    assert first["upstream"] == stable.url
    assert first["bytes_in"] == 5 and first["bytes_out"] == size
    assert first["duration_ms"] > 0
    assert first["revision"] == proxy.config.revision
    assert first["time"].endswith("Z")
    assert lines[1]["status"] == 500
