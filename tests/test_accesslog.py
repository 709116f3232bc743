"""The access log: one JSON object per line, buffered, written at least every 200 ms.

Real files in a temporary folder, and the real standard output (captured by pytest).
"""

from __future__ import annotations

import asyncio
import calendar
import io
import json
import re
import sys
import time
from pathlib import Path

import pytest

from proxy.dataplane import accesslog
from proxy.dataplane.accesslog import AccessLog


def _entry(i: int) -> dict[str, accesslog.Field]:
    return {"time": "", "request_id": f"r{i}", "status": 200, "duration_ms": 1.5,
            "ring": None, "path": "/caf\u00e9"}


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_lines_are_buffered_then_written_within_200_ms(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    try:
        log.log(_entry(1))
        log.log(_entry(2))
        assert path.read_text() == ""  # the request path never waits on a write
        assert repr(log) == f"<AccessLog {path} buffered=2>"
        # The loop runs timers in deadline order: the flush (due at 200 ms) comes first.
        await asyncio.sleep(0.25)
        entries = _lines(path)
        assert [e["request_id"] for e in entries] == ["r1", "r2"]
        assert repr(log) == f"<AccessLog {path} buffered=0>"
    finally:
        log.close()


async def test_each_line_is_one_json_object_with_the_time_first(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    before = time.time()
    log.log(_entry(1))
    log.close()
    raw = path.read_text(encoding="utf-8")
    assert raw.endswith("\n") and raw.count("\n") == 1
    assert raw.isascii()  # non-ASCII is escaped: one encoding-proof line per request
    (entry,) = _lines(path)
    assert list(entry)[:2] == ["time", "request_id"]
    assert entry == {**entry, "status": 200, "duration_ms": 1.5, "ring": None, "path": "/caf\u00e9"}
    stamp = str(entry["time"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
    logged = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))  # UTC
    assert before - 1 <= logged <= time.time() + 1


async def test_a_full_buffer_is_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    try:
        for i in range(accesslog._FLUSH_LINES - 1):
            log.log(_entry(i))
        assert path.read_text() == ""
        log.log(_entry(999))  # the 256th line: written now, not at the timer
        assert len(_lines(path)) == accesslog._FLUSH_LINES
    finally:
        log.close()


async def test_the_file_is_appended_to_and_close_writes_what_is_left(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text('{"earlier":true}\n')
    log = AccessLog(str(path))
    log.log(_entry(1))
    log.close()  # no wait for the timer
    assert [e.get("request_id") for e in _lines(path)] == [None, "r1"]
    assert log._stream.closed
    await asyncio.sleep(0.3)  # the timer was cancelled: nothing fires on a closed file
    log.log(_entry(2))  # a line after close is dropped, never raised to the request
    log.flush()
    assert len(_lines(path)) == 2


async def test_dash_is_standard_output_which_close_leaves_open(
    capsys: pytest.CaptureFixture[str],
) -> None:
    log = AccessLog("-")
    assert log._stream is sys.stdout
    log.log(_entry(7))
    log.close()
    out = capsys.readouterr().out
    assert json.loads(out)["request_id"] == "r7"
    assert not sys.stdout.closed


async def test_a_closed_standard_output_does_not_fail_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    log = AccessLog("-")
    log.log(_entry(1))
    log.flush()  # ValueError from the closed stream is swallowed
    log.close()
    assert repr(log) == "<AccessLog - buffered=0>"


async def test_a_request_line_is_what_log_writes_for_the_same_fields(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    fields: dict[str, accesslog.Field] = {
        "time": "", "request_id": "r\"1\\", "client": "127.0.0.1", "method": "GET",
        "host": "h\u00e9.test", "protocol": "HTTP/1.1", "user_agent": "curl/8 \"x\"\n\u00ff",
        "path": "/caf\u00e9?\n", "status": 200, "duration_ms": 0.001, "upstream_ms": 12.5,
        "route": "r", "ring": None, "reason": "bucket", "bucket": 0, "pool": "p",
        "upstream": None, "bytes_in": 0, "bytes_out": 12, "error": "client_closed",
        "revision": "abc",
    }
    assert tuple(fields) == accesslog.FIELDS
    log.log(dict(fields))
    values = [v for k, v in fields.items() if k != "time"]
    values[5] = str(values[5]).encode("latin-1")  # the User-Agent header's bytes
    log.log_request(*values)  # type: ignore[arg-type]
    log.log_request("r2", "127.0.0.1", "GET", "h", "upgrade/websocket", None, "/ws", 101,
                    1500.0, None, None, None, None, None, None, None, 0, 0, None, "abc")
    log.close()
    first, second, third = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(first) == {**json.loads(second), "time": json.loads(first)["time"]}
    assert '"duration_ms":0.001,"upstream_ms":12.500,' in second  # milliseconds: 3 decimals
    assert json.loads(second) == {**fields, "time": json.loads(second)["time"]}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", json.loads(second)["time"])
    assert list(json.loads(third)) == list(accesslog.FIELDS)
    assert json.loads(third)["user_agent"] is None and json.loads(third)["upstream_ms"] is None


async def test_a_long_user_agent_is_cut_and_never_cached(tmp_path: Path) -> None:
    """A client may send a 32 KiB User-Agent: the line keeps its first 512 bytes, and the
    formatted client fields of such requests are not kept (4,096 of them, escaped, were
    hundreds of MiB); short ones are still cached."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    agents = [b"\xff" * 30_000 + bytes([i % 256]) for i in range(50)]
    for agent in [*agents, b"curl/8"]:
        log.log_request("r", "127.0.0.1", "GET", "h", "HTTP/1.1", agent, "/", 200, 1.0, 0.5,
                        "api", "stable", "default", None, "p", None, 0, 0, None, "abc")
    log.close()
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 51
    assert lines[0]["user_agent"] == "\u00ff" * accesslog.USER_AGENT_MAX + "..."
    assert lines[-1]["user_agent"] == "curl/8"
    assert len(log._clients) == 1  # only the short one


async def test_request_ids_are_written_as_json_whatever_they_hold(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    # (The second and the last are isalnum, though not ASCII: escaped as json.dumps does.)
    ids = ["0123abcdef", "caf\u00e9", "a-b:c.d_e", "q\"\\\n", "\u00b2\u0663"]
    for rid in ids:
        log.log_request(rid, "127.0.0.1", "GET", "h", "HTTP/1.1", None, "/", 200, 1.0, None,
                        None, None, None, None, None, None, 0, 0, None, "abc")
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ids
    assert all(line.isascii() for line in lines)  # as json.dumps writes them
    assert '"request_id":"0123abcdef",' in lines[0]
    assert '"request_id":"caf\\u00e9",' in lines[1]


async def test_an_id_the_data_plane_vouches_for_is_written_as_it_is(tmp_path: Path) -> None:
    """The exchange passes ``plain_id`` (its ids are generated hex or matched
    request_id_ok's characters): the same line as the escaped id gives, for such an id."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    for plain in (False, True):
        log.log_request("a-b:c.d_E9", "127.0.0.1", "GET", b"h", "HTTP/1.1", None, "/", 200,
                        1.0, None, None, None, None, None, None, None, 0, 0, None, "abc",
                        plain_id=plain)
    log.close()
    escaped, plain_line = path.read_bytes().splitlines()
    assert json.loads(escaped)["request_id"] == "a-b:c.d_E9"
    assert json.loads(plain_line) == {**json.loads(escaped), "time": json.loads(plain_line)["time"]}
    assert json.loads(escaped)["host"] == "h"  # the Host header's bytes, decoded
