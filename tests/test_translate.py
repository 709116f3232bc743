"""The upstream side's exception table: what an upstream can cause, and nothing else."""

from __future__ import annotations

import errno
import ssl

import pytest

from proxy.dataplane.upstream import translate
from proxy.errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamResetError,
    UpstreamTimeout,
)


@pytest.mark.parametrize(
    ("exc", "connecting", "expected", "status", "kind"),
    [
        (TimeoutError(), True, UpstreamConnectTimeout, 504, "connect"),
        (TimeoutError(), False, UpstreamTimeout, 504, "timeout"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True,
         UpstreamConnectError, 502, "connect"),
        (OSError(errno.EHOSTUNREACH, "unreachable"), True, UpstreamConnectError, 502, "connect"),
        (ssl.SSLCertVerificationError("certificate verify failed"), True,
         UpstreamConnectError, 502, "connect"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), False, UpstreamResetError, 502, "reset"),
        (BrokenPipeError(errno.EPIPE, "pipe"), False, UpstreamResetError, 502, "reset"),
        (ssl.SSLError("bad record mac"), False, UpstreamResetError, 502, "reset"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_each_upstream_failure_maps_to_one_error(
    exc: Exception, connecting: bool, expected: type[UpstreamError], status: int, kind: str
) -> None:
    ours = translate(exc, connecting=connecting)
    assert type(ours) is expected
    assert (ours.status, ours.kind) == (status, kind)
    assert str(ours)  # the foreign message, or the error's own reason when it has none


@pytest.mark.parametrize(
    "exc",
    [
        AttributeError("'NoneType' object has no attribute 'x'"),
        KeyError("ring"),
        TypeError("unsupported operand"),
        ValueError("a bad value of ours"),
        RuntimeError("pool not started"),
        AssertionError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_anything_else_is_not_an_upstream_failure(exc: Exception) -> None:
    # The exchange answers these with a 500 that is never judged; translate refuses them.
    with pytest.raises(TypeError, match="is not an upstream failure"):
        translate(exc)


def test_our_own_errors_pass_unchanged() -> None:
    # UpstreamTimeout is also a TimeoutError, so the table would match it: it is kept.
    ours = UpstreamTimeout("no response within the ring timeout")
    assert translate(ours) is ours
