"""A defect in the proxy itself is a 500 with a logged traceback, and never judged.

The rollout judge reads each ring's tally: a fault of ours counted there as an upstream
failure would roll back a healthy version.  Most faults are injected into one function of
the proxy on the upstream path (no input triggers a real one); everything around it is
the real proxy, over real sockets, with a real upstream.
"""

from __future__ import annotations

import json
import logging
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path

import aiohttp
import pytest

from proxy.dataplane.exchange import Exchange
from proxy.dataplane.upstream import UpstreamConnection
from proxy.metrics import CODE_CLASSES, ERROR_KINDS
from proxy.server import Proxy
from tests.conftest import ProxyFactory, Upstream, raw_exchange


def _config(upstream: str, access_log: Path) -> str:
    return textwrap.dedent(
        f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: true, path: '{access_log}'}}
        pools:
          p: {{servers: ["{upstream}"]}}
        routes:
          - name: r
            rings:
              - name: only
                pool: p
        """
    )


class InjectedDefect(Exception):
    """What the injected fault raises (no aiohttp, OS or timeout exception)."""


def _tracebacks(records: Iterable[logging.LogRecord]) -> list[logging.LogRecord]:
    return [
        r for r in records
        if r.exc_info and isinstance(r.exc_info[1], InjectedDefect) and r.levelno >= logging.ERROR
    ]


def _outcomes(proxy: Proxy) -> tuple[dict[str, int], dict[str, int], int, int]:
    """The ring's counters by class and kind, and the judged requests and errors (its
    window's, which are its tally's)."""
    ring = proxy.runtime.rings["r"][0]
    recorder = proxy.metrics._recorders[("r", "only", "p")]
    assert ring.recorder is recorder
    window = proxy.metrics.window("r", "only", time.monotonic(), 60)
    tally = proxy.metrics.tally("r", "only")
    assert (window.requests, window.errors) == (tally.requests, tally.errors)
    return (
        dict(zip(CODE_CLASSES, recorder.requests, strict=True)),
        dict(zip(ERROR_KINDS, recorder.upstream_errors, strict=True)),
        window.requests,
        window.errors,
    )


@pytest.mark.interpreted
async def test_a_defect_on_the_upstream_path_is_a_500_logged_and_never_judged(
    make_proxy: ProxyFactory,
    stable: Upstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    log_path = tmp_path / "access.log"
    proxy = await make_proxy(_config(stable.url, log_path))
    async with client.get(proxy.url + "/before") as r:
        assert r.status == 200

    def broken(self: object, *args: object, **kwargs: object) -> None:
        raise InjectedDefect("a bug in ringproxy's upstream connection")

    # A fault inside the upstream call: sending the request on the upstream connection.
    monkeypatch.setattr(UpstreamConnection, "send", broken)
    with caplog.at_level(logging.ERROR):
        async with client.get(proxy.url + "/fault", headers={"X-Request-Id": "fault-1"}) as r:
            assert r.status == 500
            assert r.headers["X-Request-Id"] == "fault-1"
            text = await r.text()
    assert text.startswith("ringproxy: ")
    assert "Traceback" not in text and "InjectedDefect" not in text
    # Logged once, with its traceback and the request id.
    (logged,) = _tracebacks(caplog.records)
    assert "fault-1" in logged.getMessage()

    assert proxy.access_log is not None
    proxy.access_log.flush()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(e["path"], e["status"], e["error"]) for e in lines] == [
        ("/before", 200, None), ("/fault", 500, "internal"),
    ]
    assert lines[1]["ring"] == "only"

    classes, kinds, requests, errors = _outcomes(proxy)
    # Visible as a class of its own, and no upstream error of the version ...
    assert classes["internal"] == 1 and classes["2xx"] == 1
    assert sum(classes.values()) == 2
    assert not any(kinds.values())
    # ... and the window the judge reads holds only the good request.
    assert (requests, errors) == (1, 0)

    monkeypatch.undo()  # the ring serves on
    async with client.get(proxy.url + "/after") as r:
        assert r.status == 200


@pytest.mark.interpreted
async def test_a_defect_after_the_response_started_cuts_it_and_is_never_judged(
    make_proxy: ProxyFactory,
    stable: Upstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    log_path = tmp_path / "access.log"
    proxy = await make_proxy(_config(stable.url, log_path))

    relay = Exchange.response_body
    calls: list[int] = []

    def broken(self: Exchange, data: bytes) -> None:
        calls.append(len(data))
        if len(calls) > 1:
            raise InjectedDefect("a bug while relaying the body")
        relay(self, data)

    # The status line and the first piece are out when the fault strikes.
    monkeypatch.setattr(Exchange, "response_body", broken)
    with caplog.at_level(logging.ERROR):
        async with client.get(proxy.url + "/bytes/4000000") as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()  # cut: never a complete-looking body
    (logged,) = _tracebacks(caplog.records)
    assert "/bytes/4000000" in logged.getMessage()

    assert proxy.access_log is not None
    proxy.access_log.flush()
    (entry,) = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert (entry["status"], entry["error"]) == (200, "internal")
    assert 0 < entry["bytes_out"] < 4000000
    classes, kinds, requests, errors = _outcomes(proxy)
    assert classes["internal"] == 1 and sum(classes.values()) == 1
    assert not any(kinds.values())
    assert (requests, errors) == (0, 0)


async def test_an_upgrade_the_upstream_refuses_is_relayed_as_its_answer(
    make_proxy: ProxyFactory, stable: Upstream, tmp_path: Path
) -> None:
    # Upgrade and Connection but no Sec-WebSocket-Key: the proxy passes the handshake on as
    # it came (after a 101 it only tunnels bytes), and the upstream's refusal, its own
    # 400, goes back to the client as a normal response, then the connection closes.
    proxy = await make_proxy(_config(stable.url, tmp_path / "access.log"))
    raw = await raw_exchange(
        proxy.url,
        b"GET /ws HTTP/1.1\r\nHost: h.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
        wait=2.0,
    )
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in raw.lower()
    classes, kinds, requests, errors = _outcomes(proxy)
    assert classes["4xx"] == 1 and sum(classes.values()) == 1
    assert not any(kinds.values())
    assert (requests, errors) == (1, 0)  # the upstream's answer, and not an error status
    assert proxy.access_log is not None
    proxy.access_log.flush()
    (entry,) = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    assert (entry["status"], entry["error"]) == (400, None)
