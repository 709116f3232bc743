"""Assignment through the real proxy: buckets, anonymous cookies, overrides, headers."""

from __future__ import annotations

import textwrap
from http.cookies import SimpleCookie

import aiohttp
import pytest

from proxy.routing.assign import bucket_of
from tests.conftest import ProxyFactory, Upstream, headers_of

SECRET = "override-secret-0123456789"


def config(stable: str, canary: str, extra: str = "", anonymous: str = "") -> str:
    return textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        pools:
          stable: {{servers: ["{stable}"]}}
          canary: {{servers: ["{canary}"]}}
        routes:
          - name: api
            sticky:
              key: ["header:X-User-Id", "cookie:uid"]
              {anonymous}
            override:
              header: X-Ring-Override
              secret_header: X-Override-Token
              secret: ${{OVERRIDE_SECRET}}
            {extra}
            rings:
              - {{name: canary, pool: canary, weight: 30}}
              - {{name: stable, pool: stable}}
    """)


@pytest.fixture
async def assigned(make_proxy: ProxyFactory, stable: Upstream, canary: Upstream,
                   monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OVERRIDE_SECRET", SECRET)

    async def start(**kw: str):
        return await make_proxy(config(stable.url, canary.url, **kw))

    return start


async def test_users_land_by_bucket_and_stay(
    assigned, stable: Upstream, canary: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await assigned()
    users = [f"user-{i}" for i in range(200)]
    for user in users:
        expected = "canary" if bucket_of("api", user) < 3000 else "stable"
        for _ in range(2):
            async with client.get(proxy.url + "/", headers={"X-User-Id": user}) as r:
                assert r.headers["X-Upstream"] == expected, user
                assert "X-Ring" not in r.headers  # not returned unless configured
    assert 40 <= len(canary.requests) / 2 <= 80  # about 30 % of 200
    seen = headers_of(canary.requests[-1])
    assert seen["x-ring"] == "canary"
    assert "x-ring-reason" not in seen


async def test_anonymous_user_gets_a_cookie_and_keeps_the_ring(
    assigned, client: aiohttp.ClientSession
) -> None:
    proxy = await assigned(
        anonymous="anonymous: {cookie: rp_uid, max_age: 7d, secure: auto}",
        extra="decision: {reason_upstream: true, response: true}",
    )
    rings = set()
    for _ in range(40):
        async with client.get(proxy.url + "/") as r:
            set_cookie = r.headers["Set-Cookie"]
            ring = r.headers["X-Ring"]
            # the default ring's share of buckets is "everyone else": reason default
            expected = "bucket" if ring == "canary" else "default"
            assert r.headers["X-Ring-Reason"] == expected
        morsel = SimpleCookie(set_cookie)["rp_uid"]
        assert len(morsel.value) == 32
        assert morsel["max-age"] == "604800" and morsel["httponly"] and morsel["path"] == "/"
        assert morsel["samesite"] == "Lax"
        assert not morsel["secure"]  # plain http
        for _ in range(3):
            async with client.get(proxy.url + "/", cookies={"rp_uid": morsel.value}) as r:
                assert r.headers["X-Ring"] == ring
                assert "Set-Cookie" not in r.headers
        rings.add(ring)
    assert rings == {"canary", "stable"}
    async with client.get(proxy.url + "/", headers={"X-Forwarded-Proto": "https"}) as r:
        assert "Secure" in r.headers["Set-Cookie"]


async def test_reason_header_upstream_and_response_headers(
    assigned, stable: Upstream, canary: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await assigned(extra="decision: {reason_upstream: true, response: true}")
    async with client.get(proxy.url + "/") as r:  # no key, no anonymous ids: default ring
        assert (r.headers["X-Ring"], r.headers["X-Ring-Reason"]) == ("stable", "default")
    assert headers_of(stable.requests[-1])["x-ring-reason"] == "default"


async def test_override_with_the_secret(
    assigned, canary: Upstream, client: aiohttp.ClientSession
) -> None:
    proxy = await assigned(extra="decision: {response: true}")
    user = next(f"u{i}" for i in range(1000) if bucket_of("api", f"u{i}") >= 3000)  # stable
    headers = {"X-User-Id": user, "X-Ring-Override": "canary"}
    async with client.get(proxy.url + "/", headers=headers) as r:
        assert r.headers["X-Ring"] == "stable"  # no proof: ignored
    async with client.get(proxy.url + "/", headers={**headers, "X-Override-Token": SECRET}) as r:
        assert (r.headers["X-Ring"], r.headers["X-Ring-Reason"]) == ("canary", "override")
        assert r.headers["X-Upstream"] == "canary"
    seen = headers_of(canary.requests[-1])
    assert seen["x-ring"] == "canary"
    assert "x-override-token" not in seen  # the secret never leaves the proxy


async def test_error_responses_still_set_the_anonymous_cookie(
    make_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch, client: aiohttp.ClientSession
) -> None:
    monkeypatch.setenv("OVERRIDE_SECRET", SECRET)
    proxy = await make_proxy(config("http://127.0.0.1:1", "http://127.0.0.1:1",
                                    anonymous="anonymous: true"))
    async with client.get(proxy.url + "/") as r:
        assert r.status == 502
        assert r.headers["Set-Cookie"].startswith("ringproxy_uid=")
