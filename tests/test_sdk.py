"""The SDK (proxy.client) against a real proxy on 127.0.0.1: rings and pools CRUD, the
rollout actions, events, and its errors.  The SDK is synchronous (urllib): each call runs in
a thread beside the proxy's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import pytest

import proxy.client
from proxy.client import AdminClientError, Client
from proxy.config import load_config
from proxy.server import Proxy
from tests.conftest import Upstream
from tests.test_rings_api_sockets import ADMIN, VIEW, config_text, read_text

T = TypeVar("T")


async def run(call: Callable[[], T]) -> T:
    return await asyncio.to_thread(call)


@pytest.fixture
async def served(stable: Upstream, canary: Upstream, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Proxy]:
    from tests.test_rings_api_sockets import TOKENS

    for k, v in TOKENS.items():
        monkeypatch.setenv(k, v)
    path = tmp_path / "ringproxy.yaml"
    text = config_text(stable, canary, tmp_path).replace(
        "    sticky:", "    analysis: {interval: 10s}\n    sticky:")
    path.write_text(text)
    running = Proxy(load_config(path))
    await running.start()
    yield running
    await running.stop()


def test_exported_members() -> None:
    for name in proxy.client.__all__:
        assert hasattr(proxy.client, name), name
    assert repr(Client("http://127.0.0.1:9901/", "secret")) == \
        "<Client http://127.0.0.1:9901 token=set>"


async def test_rings_crud_through_the_sdk(served: Proxy) -> None:
    client = Client(served.admin_url, ADMIN)
    ring = await run(lambda: client.rings.create(
        "api", {"name": "beta", "pool": "canary", "weight": 5}, reason="first users"))
    assert (ring["name"], ring["position"], ring["status"]) == (
        "beta", 1, {"weight": 5.0, "phase": "steady", "default": False, "active": True})
    assert ring["revision"] == served.config.revision
    listed = await run(lambda: client.rings.list("api", pool="canary"))
    assert [r["name"] for r in listed] == ["internal", "beta"]
    written = await run(lambda: client.rings.update("api", "beta", {"weight": 10},
                                                    if_match=ring["revision"]))
    assert written["changed"] and written["ring"] is not None
    assert written["ring"]["spec"] == {"name": "beta", "pool": "canary", "weight": 10}
    with pytest.raises(AdminClientError) as exc:
        await run(lambda: client.rings.update("api", "beta", {"weight": 20},
                                              if_match=ring["revision"]))
    assert exc.value.http_status == 412 and "(HTTP 412)" in str(exc.value)
    same = await run(lambda: client.rings.update("api", "beta", {"weight": 10}))
    assert (same["changed"], same["event"]) == (False, None)
    gone = await run(lambda: client.rings.delete("api", "beta", reason="done"))
    assert gone["event"] is not None and gone["event"]["reason"] == "done"
    assert "name: beta" not in read_text(Path(served.config.source))
    with pytest.raises(AdminClientError) as exc:
        await run(lambda: client.rings.get("api", "beta"))
    assert exc.value.http_status == 404


async def test_pools_crud_and_the_roles(served: Proxy) -> None:
    client, viewer = Client(served.admin_url, ADMIN), Client(served.admin_url, VIEW)
    pool = await run(lambda: client.pools.create("next", {"servers": ["http://127.0.0.1:9"]}))
    assert pool["status"] == {"servers": ["http://127.0.0.1:9"], "rings": [],
                              "environment": None, "credentials": []}
    assert [p["name"] for p in await run(viewer.pools.list)] == ["stable", "canary", "next"]
    with pytest.raises(AdminClientError) as exc:
        await run(lambda: viewer.pools.delete("next"))
    assert exc.value.http_status == 403
    written = await run(lambda: client.pools.update(
        "next", {"servers": ["http://127.0.0.1:10"]}, replace=True))
    assert written["pool"] is not None and written["pool"]["spec"] == {
        "servers": ["http://127.0.0.1:10"]}
    await run(lambda: client.pools.delete("next"))
    assert [p["name"] for p in await run(client.pools.list)] == ["stable", "canary"]


async def test_rollout_actions_and_events(served: Proxy) -> None:
    client = Client(served.admin_url, ADMIN)
    await run(lambda: client.rings.create("api", {"name": "beta", "pool": "canary",
                                                  "weight": 5}))
    moved = await run(lambda: client.set_weight("api", "beta", 2.5, reason="slower"))
    assert moved["ring"]["weight"] == 2.5 and moved["ring"]["phase"] == "paused"
    await run(lambda: client.rollback("api", "beta", reason="bad"))
    rolled = await run(lambda: client.rings.list("api", phase="rolled_back"))
    assert [(r["name"], r["status"] and r["status"]["active"]) for r in rolled] == [
        ("beta", False)]
    await run(lambda: client.resume("api", "beta"))
    events = await run(lambda: client.events(route="api"))
    assert [e["kind"] for e in events] == ["config_change", "set_weight", "rollback", "resume"]
    assert all(e["actor"] == "admin:RA_ADMIN" for e in events)
    status = await run(client.status)
    assert [r["name"] for r in status["routes"][0]["rings"]] == ["internal", "beta", "stable"]
    assert (await run(client.reload))["changed"] is False
    with pytest.raises(AdminClientError) as exc:
        await run(lambda: client.events(route="nope"))
    assert exc.value.http_status == 404


def test_an_unreachable_api_is_one_line_without_a_status() -> None:
    with pytest.raises(AdminClientError) as exc:
        Client("http://127.0.0.1:1", timeout=2).rings.list("api")
    assert exc.value.http_status is None
    assert str(exc.value).startswith("cannot reach the admin API at http://127.0.0.1:1")
