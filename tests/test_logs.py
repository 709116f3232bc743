"""The process log's formats (``proxy.processlog``) and the request-id rule, directly.

A real ``logging`` logger writes through the handler ``setup`` installs, into a StringIO;
what a client or an admin caller could put into a message cannot start a line of its own.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from proxy import processlog
from proxy.dataplane.headers import request_id_ok

FORGED = "ok\n2026-01-01 00:00:00,000 ERROR ringproxy: forged\r\x1b[31mred\u2028x"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """The root logger's handlers as they were, after the test's ``setup``."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    yield out
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    processlog._forced = False


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_text_lines_escape_control_characters_of_the_message(stream: io.StringIO) -> None:
    processlog.setup("info", None, stream)
    logging.getLogger("ringproxy.test").warning("reason %s", FORGED)
    (line,) = lines(stream)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING ringproxy.test: .*", line)
    assert line.endswith(r"reason ok\n2026-01-01 00:00:00,000 ERROR ringproxy: forged\r"
                         r"\x1b[31mred\u2028x")


def test_a_traceback_follows_its_record_indented(stream: io.StringIO) -> None:
    processlog.setup("info", "text", stream)
    try:
        raise ValueError("bad\nSTARTS A LINE?")
    except ValueError:
        logging.getLogger("ringproxy").exception("failed on %s", "/p\n")
    first, *rest = lines(stream)
    assert first.endswith(r"ERROR ringproxy: failed on /p\n")
    assert rest and all(line.startswith("  ") for line in rest)
    assert "  Traceback (most recent call last):" in rest
    assert "  ValueError: bad" in rest and "  STARTS A LINE?" in rest


def test_json_lines_hold_time_level_logger_message_fields_and_exception(
    stream: io.StringIO,
) -> None:
    processlog.setup("debug", "json", stream)
    log = logging.getLogger("ringproxy.dataplane")
    log.info("rejected a request from %s: %s", "192.0.2.1", FORGED,
             extra={"client": "192.0.2.1", "time": "not mine", "count": 3})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.error("defect", exc_info=True)
    first, second = (json.loads(line) for line in lines(stream))
    assert list(first)[:4] == ["time", "level", "logger", "message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert first["level"] == "INFO" and first["logger"] == "ringproxy.dataplane"
    assert first["message"] == f"rejected a request from 192.0.2.1: {FORGED}"
    assert first["client"] == "192.0.2.1" and first["count"] == 3  # extra= fields
    assert "exception" not in first
    assert second["level"] == "ERROR" and second["message"] == "defect"
    assert "RuntimeError: boom" in second["exception"]
    assert stream.getvalue().isascii() and stream.getvalue().count("\n") == 2


def test_the_config_format_applies_unless_the_command_line_chose_one(
    stream: io.StringIO,
) -> None:
    log = logging.getLogger("ringproxy")
    processlog.setup("info", None, stream)
    log.info("one")
    processlog.use_config_format("json")
    log.info("two")
    processlog.use_config_format("text")
    log.info("three")
    one, two, three = lines(stream)
    assert one.endswith("INFO ringproxy: one") and three.endswith("INFO ringproxy: three")
    assert json.loads(two)["message"] == "two"
    stream.truncate(0)
    stream.seek(0)
    processlog.setup("info", "text", stream)  # --log-format text
    processlog.use_config_format("json")
    log.info("four")
    assert lines(stream)[0].endswith("INFO ringproxy: four")


def test_setup_replaces_its_own_handler_only(stream: io.StringIO) -> None:
    other = logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    root.addHandler(other)
    try:
        processlog.setup("info", None, stream)
        processlog.setup("warning", None, stream)
        ours = [h for h in root.handlers if isinstance(h, processlog._Handler)]
        assert len(ours) == 1 and other in root.handlers
        assert root.level == logging.WARNING
    finally:
        root.removeHandler(other)
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        processlog.formatter("xml")


def test_escape_leaves_plain_text_alone() -> None:
    text = "GET /caf\u00e9 \"quoted\" \\ tab-free"
    assert processlog.escape(text) is text
    assert processlog.escape("a\tb\x00c\x7f\x85") == r"a\tb\x00c\x7f\x85"


@pytest.mark.parametrize("value", [
    b"abc", b"0f8fad5b-d9cb-469f-a165-70867728950e", b"00-4bf92f3577b34da6-00f067aa0ba902b7-01",
    b"Root=1-67891233-abcdef012345678912345678".replace(b"=", b":"), b"a" * 128, b"A.b_c:d-e",
])
def test_sane_request_ids_are_kept(value: bytes) -> None:
    assert request_id_ok(value)


@pytest.mark.parametrize("value", [
    b"", b"a" * 129, b"a b", b"a\nb", b"a\x01b", "\u00e9".encode(), b"<script>", b'"x"',
    b"a/b", b"a=b", b"%0a", b"a;b",
])
def test_other_request_ids_are_replaced(value: bytes) -> None:
    assert not request_id_ok(value)


def test_the_length_limit_is_the_configured_one() -> None:
    assert request_id_ok(b"a" * 200, 200) and not request_id_ok(b"a" * 17, 16)
