"""The Rings API on real sockets: rings and pools changed through the admin API land in the
config file (comments kept), are reloaded, and take traffic; stale writes are 412, a
read-only config is 409, every change is an audit event with its actor and diff."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.config import load_config
from proxy.server import Proxy
from tests.conftest import Upstream

ADMIN = "rings-admin-token-0123456789"
OPS = "rings-operator-token-0123456"
OPS_BETA = "rings-operator-beta-0123456"
VIEW = "rings-viewer-token-01234567"
TOKENS = {"RA_ADMIN": ADMIN, "RA_OPS": OPS, "RA_OPS_BETA": OPS_BETA, "RA_VIEW": VIEW}


def config_text(stable: Upstream, canary: Upstream, tmp_path: Path, extra: str = "") -> str:
    return f"""\
# The edge proxy of the shop.  Owned by the platform team.
listen: 127.0.0.1:0
admin:
  listen: 127.0.0.1:0
  tokens:
    - {{env: RA_ADMIN, role: admin}}
    - {{env: RA_OPS, role: operator}}
    - {{env: RA_OPS_BETA, role: operator, rings: [beta]}}   # QA's token
    - {{env: RA_VIEW, role: viewer}}
{extra}access_log: {{enabled: false}}
state: {{path: "{tmp_path / 'state.json'}", audit: "{tmp_path / 'audit.jsonl'}"}}

pools:
  stable:
    servers: ["{stable.url}"]   # the release everyone gets
  canary:
    servers: ["{canary.url}"]

routes:
  - name: api
    sticky: {{key: ["header:X-User-Id"]}}   # who a user is
    rings:
      # Employees first.
      - name: internal
        pool: canary
        rules:
          - {{attr: "header:X-Employee", exists: true}}
      # Everyone else.
      - name: stable          # the default ring
        pool: stable
"""


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in TOKENS.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
async def served(stable: Upstream, canary: Upstream, tmp_path: Path,
                 tokens: None) -> AsyncIterator[Proxy]:
    path = tmp_path / "ringproxy.yaml"
    path.write_text(config_text(stable, canary, tmp_path))
    proxy = Proxy(load_config(path))
    await proxy.start()
    yield proxy
    await proxy.stop()


async def call(proxy: Proxy, method: str, path: str, token: str | None = ADMIN,
               body: object | None = None, headers: dict[str, str] | None = None
               ) -> tuple[int, dict, CIMultiDict[str]]:
    sent = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    async with aiohttp.ClientSession() as client, client.request(
            method, proxy.admin_url + path, json=body, headers=sent) as r:
        return r.status, await r.json(), CIMultiDict(r.headers)


def read_text(path: Path) -> str:
    return path.read_text()


def read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def comments(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if "#" in line]


async def test_a_ring_created_through_the_api_takes_traffic(served: Proxy, stable: Upstream,
                                                            canary: Upstream) -> None:
    before = served.config.revision
    status, body, headers = await call(served, "POST", "/api/routes/api/rings", body={
        "name": "beta", "pool": "canary", "rules": [{"attr": "header:X-Beta", "equals": "1"}]})
    assert status == 201, body
    assert body["previous_revision"] == before and body["revision"] == served.config.revision
    assert body["revision"] != before and headers["ETag"] == f'"{body["revision"]}"'
    assert headers["Location"] == "/api/routes/api/rings/beta"
    ring = body["ring"]
    assert (ring["name"], ring["position"], ring["spec"]["pool"]) == ("beta", 1, "canary")
    assert ring["status"] == {"weight": None, "phase": "steady", "default": False,
                              "active": True}
    async with aiohttp.ClientSession() as client:
        async with client.get(served.url + "/hello", headers={"X-Beta": "1"}) as r:
            assert (r.status, (await r.json())["upstream"]) == (200, "canary")
        async with client.get(served.url + "/hello") as r:
            assert (r.status, (await r.json())["upstream"]) == (200, "stable")
    status, body, _ = await call(served, "GET", "/api/routes/api/rings", token=VIEW)
    assert [r["name"] for r in body["rings"]] == ["internal", "beta", "stable"]


async def test_a_stale_if_match_is_412_and_writes_nothing(served: Proxy) -> None:
    path = Path(served.config.source)
    status, body, headers = await call(served, "GET", "/api/routes/api/rings/internal")
    assert status == 200 and body["ring"]["revision"] == body["revision"]
    first = headers["ETag"]
    status, body, headers = await call(served, "PATCH", "/api/routes/api/rings/internal",
                                       body={"pool": "stable"}, headers={"If-Match": first})
    assert status == 200, body
    assert body["ring"]["spec"]["pool"] == "stable" and headers["ETag"] != first
    on_disk = read_bytes(path)
    status, body, _ = await call(served, "PATCH", "/api/routes/api/rings/internal",
                                 body={"pool": "canary"}, headers={"If-Match": first})
    assert status == 412 and "changed since" in body["error"], body
    assert read_bytes(path) == on_disk


async def test_concurrent_writes_with_one_revision_one_wins(served: Proxy) -> None:
    _, _, headers = await call(served, "GET", "/api/pools")
    etag = headers["ETag"]
    results = await asyncio.gather(*(
        call(served, "PATCH", "/api/pools/canary", body={"connect_timeout": f"{n}s"},
             headers={"If-Match": etag}) for n in (3, 4)))
    assert sorted(status for status, _, _ in results) == [200, 412]


async def test_the_file_keeps_its_comments_after_three_edits(served: Proxy) -> None:
    path = Path(served.config.source)
    original = read_text(path)
    status, body, _ = await call(served, "POST", "/api/pools",
                                 body={"name": "next", "servers": ["http://127.0.0.1:9"]})
    assert status == 201, body
    status, body, _ = await call(served, "POST", "/api/routes/api/rings?before=internal",
                                 body={"name": "beta", "pool": "next", "weight": 0})
    assert status == 201, body
    status, body, _ = await call(served, "PUT", "/api/routes/api/rings/stable",
                                 body={"pool": "stable", "policy": {"timeout": "5s"}})
    assert status == 200, body
    text = read_text(path)
    assert comments(text) == comments(original)
    assert text.startswith(original.split("pools:")[0])  # the head is untouched
    assert "      - name: beta\n        pool: next\n        weight: 0\n" in text
    assert "  next:\n    servers: [http://127.0.0.1:9]\n\nroutes:" in text
    # Undone: the file is the original again, byte for byte.
    for method, where in (("DELETE", "/api/routes/api/rings/beta"),
                          ("DELETE", "/api/pools/next"),
                          ("PUT", "/api/routes/api/rings/stable")):
        status, body, _ = await call(served, method, where, body={"pool": "stable"}
                                     if method == "PUT" else None)
        assert status == 200, body
    assert read_text(path) == original


async def test_a_change_the_loader_rejects_writes_nothing(served: Proxy) -> None:
    path = Path(served.config.source)
    on_disk = read_bytes(path)
    for body, message in [
        ({"name": "beta", "pool": "nowhere"}, "unknown pool 'nowhere'"),
        ({"name": "beta", "pool": "canary", "weight": 120}, "120 is outside 0..100"),
        ({"name": "beta", "pool": "canary", "colour": "red"}, "unknown key"),
    ]:
        status, answer, _ = await call(served, "POST", "/api/routes/api/rings", body=body)
        assert status == 422 and message in answer["error"], answer
        assert "not written" in answer["error"]
    status, answer, _ = await call(served, "DELETE", "/api/pools/stable")
    assert status == 422 and "unknown pool 'stable'" in answer["error"]
    status, answer, _ = await call(served, "POST", "/api/routes/api/rings",
                                   body={"name": "internal", "pool": "canary"})
    assert status == 409 and "already has a ring 'internal'" in answer["error"]
    status, answer, _ = await call(served, "PUT", "/api/routes/api/rings/internal",
                                   body={"name": "other", "pool": "canary"})
    assert status == 400 and "not renamed" in answer["error"]
    assert read_bytes(path) == on_disk


async def test_audit_events_carry_the_actor_and_the_diff(served: Proxy) -> None:
    status, body, _ = await call(served, "PATCH", "/api/routes/api/rings/internal", token=OPS,
                                 body={"spec": {"pool": "stable"}, "reason": "canary is down"})
    assert status == 200, body
    event = body["event"]
    assert (event["kind"], event["action"], event["route"], event["ring"], event["actor"],
            event["reason"]) == ("config_change", "update", "api", "internal",
                                 "operator:RA_OPS", "canary is down")
    assert "-        pool: canary\n+        pool: stable\n" in event["diff"]
    assert (event["from_revision"], event["revision"]) == (body["previous_revision"],
                                                           body["revision"])
    status, answer, _ = await call(served, "GET", "/api/events?route=api", token=VIEW)
    assert answer["events"][-1] == event
    audit = read_text(Path(served.config.state.audit)).splitlines()
    assert json.loads(audit[-1]) == event


async def test_roles_and_operator_limits_hold(served: Proxy) -> None:
    ring = {"name": "gamma", "pool": "canary", "rules": [{"attr": "header:X-G", "exists": True}]}
    for token, status, message in [
        (None, 401, "missing bearer token"),
        (VIEW, 403, "a viewer token may not create rings"),
        (OPS_BETA, 403, "may not act on api/gamma"),
    ]:
        got, body, _ = await call(served, "POST", "/api/routes/api/rings", token, body=ring)
        assert (got, body["error"].startswith(message) or message in body["error"]) == (
            status, True), body
    got, body, _ = await call(served, "POST", "/api/routes/api/rings", OPS_BETA,
                              body={**ring, "name": "beta"})
    assert got == 201, body
    got, body, _ = await call(served, "DELETE", "/api/routes/api/rings/internal", OPS_BETA)
    assert got == 403
    got, body, _ = await call(served, "PATCH", "/api/pools/canary", OPS,
                              body={"connect_timeout": "1s"})
    assert (got, body["error"]) == (403, "only an admin token may change pools")


async def test_list_filters_by_pool_phase_and_active(served: Proxy) -> None:
    await call(served, "POST", "/api/routes/api/rings",
               body={"name": "dark", "pool": "canary", "weight": 0})

    async def names(query: str) -> list[str]:
        status, body, _ = await call(served, "GET", f"/api/routes/api/rings{query}", VIEW)
        assert status == 200, body
        return [r["name"] for r in body["rings"]]

    assert await names("?pool=canary") == ["internal", "dark"]
    assert await names("?active=true") == ["internal", "stable"]
    assert await names("?active=false") == ["dark"]
    assert await names("?phase=rolled_back") == []
    status, body, _ = await call(served, "GET", "/api/routes/api/rings?active=maybe")
    assert status == 400
    status, body, _ = await call(served, "GET", "/api/routes/nope/rings")
    assert status == 404 and "unknown route 'nope'" in body["error"]


async def test_pools_are_listed_with_the_rings_they_serve(served: Proxy) -> None:
    status, body, headers = await call(served, "GET", "/api/pools", VIEW)
    assert status == 200 and headers["ETag"] == f'"{body["revision"]}"'
    pools = {p["name"]: p for p in body["pools"]}
    assert pools["canary"]["status"]["rings"] == ["api/internal"]
    assert pools["stable"]["spec"]["servers"] == pools["stable"]["status"]["servers"]


@pytest.mark.parametrize("how", ["setting", "file"])
async def test_a_read_only_config_answers_409(stable: Upstream, canary: Upstream,
                                               tmp_path: Path, tokens: None, how: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # "file": config_writes unset and the file not writable (a ConfigMap's mount).
    path = tmp_path / "ringproxy.yaml"
    extra = "  config_writes: false\n" if how == "setting" else ""
    path.write_text(config_text(stable, canary, tmp_path, extra))
    if how == "file":
        path.chmod(0o444)
        if os.geteuid() == 0:  # root may write any file: the check is what it would see
            monkeypatch.setattr("proxy.admin.configfile.os.access", lambda *_: False)
    proxy = Proxy(load_config(path))
    await proxy.start()
    try:
        status, body, _ = await call(proxy, "POST", "/api/routes/api/rings",
                                     body={"name": "beta", "pool": "canary"})
        assert status == 409 and "change the file in Git" in body["error"], body
        assert ("config_writes: false" if how == "setting" else "is not writable") in \
            body["error"]
        status, body, _ = await call(proxy, "GET", "/api/routes/api/rings")
        assert status == 200  # reading stays
    finally:
        await proxy.stop()
