"""Hot reload over real sockets: swaps under load, open streams, bad files, symlink swaps."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.config import load_config
from proxy.rollout.machine import Trigger
from proxy.runtime import Runtime
from proxy.server import Proxy
from tests.conftest import Upstream
from tests.test_rollback_sockets import wait_for


def config_text(a: str, b: str, main_pool: str, extra_pool: str = "", header: str = "x") -> str:
    return textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        shutdown_grace: 2s
        pools:
          a: {{servers: ["{a}"]}}
          b: {{servers: ["{b}"]}}
          {extra_pool}
        routes:
          - name: api
            rings:
              - name: main
                pool: {main_pool}
                policy: {{add_headers: {{X-Edit: "{header}"}}}}
    """)


@pytest.fixture
async def reloadable(tmp_path: Path) -> AsyncIterator:
    started: list[Proxy] = []

    async def start(text: str, watch: bool = False, name: str = "ringproxy.yaml") -> Proxy:
        path = tmp_path / name
        path.write_text(text)
        proxy = Proxy(load_config(path), watch=watch)
        if proxy.reloader is not None:
            proxy.reloader.interval = 0.2
        await proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


async def test_50_reloads_under_load_lose_no_request(
    reloadable, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    texts = [config_text(stable.url, canary.url, "a"), config_text(stable.url, canary.url, "b")]
    pool_upstream = {"a": "stable", "b": "canary"}
    proxy = await reloadable(texts[0])
    path = tmp_path / "ringproxy.yaml"
    reloads: list[tuple[float, float, str]] = []  # (call started, call returned, pool after)
    records: list[tuple[float, float, int, str]] = []
    stop = asyncio.Event()

    async def load(client: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            async with client.get(proxy.url + "/x") as r:
                await r.read()
                records.append((t0, time.monotonic(), r.status, r.headers.get("X-Upstream", "")))

    async with aiohttp.ClientSession() as client:
        workers = [asyncio.ensure_future(load(client)) for _ in range(8)]
        try:
            for i in range(50):
                pool = "b" if i % 2 == 0 else "a"
                path.write_text(texts[i % 2 == 0])
                t0 = time.monotonic()
                result = await proxy.reloader.reload("test")
                reloads.append((t0, time.monotonic(), pool))
                assert result.ok and result.changed, result
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await asyncio.gather(*workers)
    assert len(records) > 200
    assert all(status == 200 for _, _, status, _ in records), "a request failed during reloads"
    # Each request went to a pool that a config possibly serving while it was in flight
    # allowed.  Config k may serve from the start of the call that loads it to the end of
    # the call that replaces it.
    timeline = [(-1.0, -1.0, "a"), *reloads]
    for start, end, _, upstream in records:
        allowed = set()
        for k, (begins, _, pool) in enumerate(timeline):
            ends = timeline[k + 1][1] if k + 1 < len(timeline) else float("inf")
            if begins <= end and start <= ends:
                allowed.add(pool_upstream[pool])
        assert upstream in allowed, (start, end, upstream, allowed)
    assert {u for *_, u in records} == {"stable", "canary"}


async def test_open_stream_and_websocket_survive_a_reload(
    reloadable, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    proxy = await reloadable(config_text(stable.url, canary.url, "a"))
    async with aiohttp.ClientSession() as client:
        sse = await client.get(proxy.url + "/sse")
        first = await asyncio.wait_for(sse.content.readuntil(b"\n\n"), 5)
        ws = await client.ws_connect(proxy.url + "/ws")
        await ws.send_str("before")
        assert (await ws.receive(timeout=5)).data == "echo:before"

        (tmp_path / "ringproxy.yaml").write_text(config_text(stable.url, canary.url, "b"))
        result = await proxy.reloader.reload("test")
        assert result.changed
        async with client.get(proxy.url + "/") as r:  # new requests use the new config
            assert r.headers["X-Upstream"] == "canary"

        await ws.send_str("after")
        assert (await ws.receive(timeout=5)).data == "echo:after"
        await ws.close()
        stable.sse_release.set()
        rest = await asyncio.wait_for(sse.content.read(), 5)
        sse.release()
    assert first + rest == b"data: first\n\ndata: second\n\n"


async def test_unchanged_pools_keep_their_connections_and_removed_ones_drain(
    reloadable, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    extra = f'c: {{servers: ["{canary.url}"]}}'
    proxy = await reloadable(config_text(stable.url, canary.url, "c", extra_pool=extra))
    pool_a, pool_c = proxy.runtime.pools["a"], proxy.runtime.pools["c"]
    async with aiohttp.ClientSession() as client:
        slow = asyncio.ensure_future(client.get(proxy.url + "/slow?s=3"))
        # In flight on pool c (canary's server) for 3 s: the reload happens meanwhile.
        await wait_for(lambda: any(r["target"] == "/slow?s=3" for r in canary.requests), 5)
        (tmp_path / "ringproxy.yaml").write_text(
            config_text(stable.url, canary.url, "a", header="y")
        )
        assert (await proxy.reloader.reload("test")).changed
        assert proxy.runtime.pools["a"] is pool_a and not pool_a.closed
        assert "c" not in proxy.runtime.pools
        assert not pool_c.closed  # still serving its in-flight request
        async with await slow as r:
            assert r.status == 200 and await r.text() == "slow done"
        await wait_for(lambda: pool_c.closed, 5)  # closed once its last request finished
        async with client.get(proxy.url + "/") as r:
            assert r.headers["X-Upstream"] == "stable"


BROKEN = {
    "yaml syntax": "listen: [unclosed\n",
    "unknown key": "{text}\nlisten_port: 1\n",
    "unknown pool": "{text_v3}",
    "weights over 100 %": "{text_weights}",
}


@pytest.mark.parametrize("kind", list(BROKEN))
async def test_a_broken_file_is_rejected_and_the_old_config_keeps_serving(
    reloadable, stable: Upstream, canary: Upstream, tmp_path: Path, kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = config_text(stable.url, canary.url, "a")
    proxy = await reloadable(good)
    revision = proxy.config.revision
    weights = good.replace("      - name: main\n", "      - {name: x, pool: a, weight: 60}\n"
                           "      - {name: y, pool: b, weight: 50}\n      - name: main\n")
    weights = weights.replace("  - name: api\n", "  - name: api\n    sticky: {key: [header:U]}\n")
    broken = BROKEN[kind].format(
        text=good, text_v3=good.replace("pool: a", "pool: v3"), text_weights=weights
    )
    path = tmp_path / "ringproxy.yaml"
    path.write_text(broken)
    result = await proxy.reloader.reload("test")
    assert not result.ok and not result.changed
    assert result.revision == revision
    assert result.errors and all(str(path) in e for e in result.errors)
    assert any("config reload rejected" in r.message for r in caplog.records)
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy.url + "/") as r:
            assert r.status == 200 and r.headers["X-Upstream"] == "stable"
        async with client.get(proxy.admin_url + "/metrics") as r:
            text = await r.text()
        assert 'ringproxy_config_reloads_total{result="failure"} 1.0' in text
        assert "ringproxy_config_last_reload_success 0.0" in text
        path.write_text(config_text(stable.url, canary.url, "b"))  # fixed
        fixed = await proxy.reloader.reload("test")
        assert fixed.ok and fixed.changed and fixed.revision != revision
        async with client.get(proxy.url + "/") as r:
            assert r.headers["X-Upstream"] == "canary"
        async with client.get(proxy.admin_url + "/metrics") as r:
            text = await r.text()
        assert "ringproxy_config_last_reload_success 1.0" in text
        assert f'ringproxy_config_info{{revision="{fixed.revision}"}} 1.0' in text
        assert f'ringproxy_config_info{{revision="{revision}"}}' not in text


async def test_an_atomic_symlink_swap_is_picked_up_within_2s(
    stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    # The Kubernetes ConfigMap layout: config.yaml -> ..data/config.yaml, ..data -> ..v1
    mount = tmp_path / "configmap"
    (mount / "..v1").mkdir(parents=True)
    (mount / "..v1" / "config.yaml").write_text(config_text(stable.url, canary.url, "a"))
    os.symlink("..v1", mount / "..data")
    os.symlink("..data/config.yaml", mount / "config.yaml")
    proxy = Proxy(load_config(mount / "config.yaml"), watch=True)
    await proxy.start()
    try:
        before = proxy.config.revision
        (mount / "..v2").mkdir()
        (mount / "..v2" / "config.yaml").write_text(config_text(stable.url, canary.url, "b"))
        os.symlink("..v2", mount / "..data_tmp")
        os.replace(mount / "..data_tmp", mount / "..data")  # the atomic swap
        swapped = time.monotonic()
        while proxy.config.revision == before and time.monotonic() - swapped < 5:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        took = time.monotonic() - swapped
        assert proxy.config.revision != before
        assert took < 2.0, took
        async with aiohttp.ClientSession() as client, client.get(proxy.url + "/") as r:
            assert r.headers["X-Upstream"] == "canary"
    finally:
        await proxy.stop()


async def test_sighup_reloads_a_running_process(
    spawn, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    path = tmp_path / "ringproxy.yaml"
    path.write_text(config_text(stable.url, canary.url, "a"))
    proc = await spawn("run", "--config", str(path), "--no-watch")
    await proc.wait_listening()
    async with aiohttp.ClientSession() as client:
        async with client.get(proc.url + "/") as r:
            assert r.headers["X-Upstream"] == "stable"
        path.write_text(config_text(stable.url, canary.url, "b"))
        await asyncio.sleep(0.8)  # --no-watch: a file change alone does nothing
        async with client.get(proc.url + "/") as r:
            assert r.headers["X-Upstream"] == "stable"
        proc.proc.send_signal(signal.SIGHUP)
        import re

        await proc.wait_listening(re.compile(rb"config reloaded \(signal\)"))
        async with client.get(proc.url + "/") as r:
            assert r.headers["X-Upstream"] == "canary"
    code, _, err = await proc.finish(signal.SIGINT)  # (SIGTERM drains first)
    assert code == 0, err


async def test_a_config_that_fails_to_apply_leaves_the_old_one_serving_and_is_counted(
    reloadable, stable: Upstream, canary: Upstream, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await reloadable(config_text(stable.url, canary.url, "a"))
    revision = proxy.config.revision
    path = tmp_path / "ringproxy.yaml"
    # Valid, but its access log sits in a directory that does not exist: only applying it
    # finds that out.  It also moves the route to pool b and adds a ring.
    log_path = tmp_path / "logs" / "access.log"
    new = config_text(stable.url, canary.url, "b").replace(
        "access_log: {enabled: false}", f"access_log: {{enabled: true, path: {log_path}}}"
    ).replace("      - name: main\n", "      - {name: beta, pool: a, rules: "
              "[{attr: 'header:X-Beta', exists: true}]}\n      - name: main\n")
    path.write_text(new)
    result = await proxy.reloader.reload("test")
    assert (result.ok, result.changed, result.revision) == (False, False, revision)
    (error,) = result.errors
    assert str(path) in error and "FileNotFoundError" in error and str(log_path) in error
    failed = [r for r in caplog.records if "applying revision" in r.getMessage()]
    assert failed and failed[0].exc_info is not None  # logged with its traceback
    assert proxy.config.revision == proxy.reloader.current.revision == revision
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy.url + "/", headers={"X-Beta": "1"}) as r:
            assert r.status == 200 and r.headers["X-Upstream"] == "stable"
        async with client.get(proxy.admin_url + "/api/routes") as r:
            assert r.status == 200  # the controller still agrees with the serving config
            (route,) = (await r.json())["routes"]
            assert [ring["name"] for ring in route["rings"]] == ["main"]
        async with client.get(proxy.admin_url + "/metrics") as r:
            text = await r.text()
        assert 'ringproxy_config_reloads_total{result="failure"} 1.0' in text
        assert "ringproxy_config_last_reload_success 0.0" in text
        assert f'ringproxy_config_info{{revision="{revision}"}} 1.0' in text

        log_path.parent.mkdir()  # the operator fixes it; the same file now applies
        fixed = await proxy.reloader.reload("test")
        assert fixed.ok and fixed.changed and fixed.revision != revision
        async with client.get(proxy.url + "/", headers={"X-Beta": "1"}) as r:
            assert r.headers["X-Upstream"] == "stable"  # ring beta, pool a
        async with client.get(proxy.url + "/") as r:
            assert r.headers["X-Upstream"] == "canary"  # ring main, now on pool b
        async with client.get(proxy.admin_url + "/metrics") as r:
            assert "ringproxy_config_last_reload_success 1.0" in await r.text()
    proxy.access_log.flush()
    assert log_path.read_text().count("\n") == 2


async def test_keys_that_need_a_restart_are_named_in_a_warning_and_the_rest_applies(
    reloadable, stable: Upstream, canary: Upstream, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await reloadable(config_text(stable.url, canary.url, "a"))
    url, admin_url = proxy.url, proxy.admin_url
    text = config_text(stable.url, canary.url, "b").replace(
        "\nlisten: 127.0.0.1:0", "\nlisten: 127.0.0.1:1", 1
    ).replace("shutdown_grace: 2s", "shutdown_grace: 3s\nstate: {path: elsewhere.json}")
    (tmp_path / "ringproxy.yaml").write_text(text)
    caplog.set_level("INFO", logger="ringproxy")
    assert (await proxy.reloader.reload("test")).changed
    warnings = sorted(r.getMessage() for r in caplog.records
                      if r.levelname == "WARNING" and r.name == "ringproxy")
    assert warnings == [
        "config reload: listen changed from 127.0.0.1:0 to 127.0.0.1:1; "
        "it takes effect at the next restart",
        "config reload: shutdown_grace changed from 2s to 3s; "
        "it takes effect at the next restart",
        "config reload: state.path changed from 'ringproxy-state.json' to 'elsewhere.json'; "
        "it takes effect at the next restart",
    ]
    assert "config reload: routes changed; applied now" in caplog.messages
    assert (proxy.url, proxy.admin_url) == (url, admin_url)
    async with aiohttp.ClientSession() as client, client.get(url + "/") as r:
        assert r.headers["X-Upstream"] == "canary"  # the live part applied


async def test_metrics_enabled_applies_live(
    reloadable, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    on = config_text(stable.url, canary.url, "a")
    proxy = await reloadable(on)
    path = tmp_path / "ringproxy.yaml"
    async with aiohttp.ClientSession() as client:

        async def scrape() -> str:
            async with client.get(proxy.url + "/") as r:
                assert r.status == 200
            async with client.get(proxy.admin_url + "/metrics") as r:
                return await r.text()

        def ok_requests(text: str) -> list[str]:
            return [line for line in text.splitlines()
                    if line.startswith("ringproxy_requests_total{") and 'ring="main"' in line
                    and 'code_class="2xx"' in line]

        assert [line.rsplit(" ", 1)[1] for line in ok_requests(await scrape())] == ["1.0"]
        path.write_text(on.replace("shutdown_grace", "metrics: {enabled: false}\nshutdown_grace"))
        assert (await proxy.reloader.reload("test")).changed
        assert 'ring="' not in await scrape()  # no per-ring series at all
        path.write_text(on + "\n# on again\n")
        assert (await proxy.reloader.reload("test")).changed
        # Counting again, from zero.
        assert [line.rsplit(" ", 1)[1] for line in ok_requests(await scrape())] == ["1.0"]


async def test_a_failure_after_the_new_runtime_is_attached_puts_the_old_one_back(
    reloadable, stable: Upstream, canary: Upstream, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = await reloadable(config_text(stable.url, canary.url, "a"))
    serving = proxy.runtime
    configure = proxy.controller.configure

    def fail_for_new(runtime: Runtime) -> None:  # fault injection: the real one, but failing
        configure(runtime)
        if runtime is not serving:
            raise RuntimeError("injected: configure failed")

    monkeypatch.setattr(proxy.controller, "configure", fail_for_new)
    extra = f'c: {{servers: ["{canary.url}"]}}'
    (tmp_path / "ringproxy.yaml").write_text(
        config_text(stable.url, canary.url, "c", extra_pool=extra))
    result = await proxy.reloader.reload("test")
    assert not result.ok and "RuntimeError: injected: configure failed" in result.errors[0]
    assert proxy.runtime is serving and proxy.plane is not None and proxy.plane.runtime is serving
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy.url + "/") as r:
            assert r.headers["X-Upstream"] == "stable"
        async with client.get(proxy.admin_url + "/api/routes") as r:
            (route,) = (await r.json())["routes"]
            assert [(ring["name"], ring["pool"]) for ring in route["rings"]] == [("main", "a")]
        async with client.get(proxy.admin_url + "/metrics") as r:
            text = await r.text()
        assert any(line.startswith("ringproxy_requests_total{") and 'pool="a"' in line
                   and line.endswith(" 1.0") for line in text.splitlines())


async def test_changed_webhooks_get_the_next_event(
    reloadable, stable: Upstream, canary: Upstream, tmp_path: Path
) -> None:
    received: list[tuple[str, str]] = []  # (which hook, event kind)

    async def hook(request: web.Request) -> web.Response:
        received.append((request.match_info["name"], (await request.json())["kind"]))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{name}", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    text = textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        state: {{path: "{tmp_path / 'state.json'}", audit: "{tmp_path / 'audit.jsonl'}"}}
        webhooks: [{{url: "http://127.0.0.1:{port}/first"}}]
        pools:
          a: {{servers: ["{stable.url}"]}}
          b: {{servers: ["{canary.url}"]}}
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            analysis: {{interval: 5m, max_error_rate: 5}}
            rings:
              - {{name: canary, pool: b, weight: 10}}
              - {{name: main, pool: a}}
    """)
    try:
        proxy = await reloadable(text)

        async def received_kinds(count: int) -> list[tuple[str, str]]:
            for _ in range(100):
                if len(received) >= count:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)  # and nothing more comes
            return list(received)

        await proxy.controller.act("api", "canary", Trigger.PAUSE, "test")
        assert await received_kinds(1) == [("first", "pause")]
        (tmp_path / "ringproxy.yaml").write_text(text.replace("/first", "/second"))
        assert (await proxy.reloader.reload("test")).changed
        await proxy.controller.act("api", "canary", Trigger.RESUME, "test")
        assert await received_kinds(2) == [("first", "pause"), ("second", "resume")]
    finally:
        await runner.cleanup()
