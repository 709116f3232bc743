"""The pool's exception table: what an upstream can cause, and nothing else."""

from __future__ import annotations

import errno

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.dataplane.pool import UPSTREAM_FAILURES, translate
from proxy.errors import (
    UpstreamBadResponse,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamResetError,
    UpstreamTimeout,
)

_KEY = ConnectionKey("up.test", 8080, False, True, None, None, None)
_URL = URL("http://up.test:8080/")
_INFO = aiohttp.RequestInfo(_URL, "GET", CIMultiDictProxy(CIMultiDict()), _URL)


def _connector_error(exc: OSError) -> aiohttp.ClientConnectorError:
    return aiohttp.ClientConnectorError(_KEY, exc)


@pytest.mark.parametrize(
    ("exc", "expected", "status", "kind"),
    [
        (aiohttp.ConnectionTimeoutError("connect"), UpstreamConnectTimeout, 504, "connect"),
        (aiohttp.SocketTimeoutError("sock_read"), UpstreamTimeout, 504, "timeout"),
        (TimeoutError(), UpstreamTimeout, 504, "timeout"),
        (_connector_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused")),
         UpstreamConnectError, 502, "connect"),
        (aiohttp.ClientConnectorDNSError(_KEY, OSError(-2, "no such name")),
         UpstreamConnectError, 502, "connect"),
        (aiohttp.ServerDisconnectedError(), UpstreamResetError, 502, "reset"),
        (aiohttp.ClientOSError(errno.ECONNRESET, "reset"), UpstreamResetError, 502, "reset"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), UpstreamResetError, 502, "reset"),
        (BrokenPipeError(errno.EPIPE, "pipe"), UpstreamResetError, 502, "reset"),
        (aiohttp.ClientResponseError(_INFO, (), status=400, message="bad status line"),
         UpstreamBadResponse, 502, "bad_response"),
        (aiohttp.WSServerHandshakeError(_INFO, (), status=403, message="refused upgrade"),
         UpstreamBadResponse, 502, "bad_response"),
        (aiohttp.ClientPayloadError("incomplete body"), UpstreamBadResponse, 502, "bad_response"),
        (aiohttp.ClientConnectionError("closed mid-way"), UpstreamBadResponse, 502, "bad_response"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_each_upstream_failure_maps_to_one_error(
    exc: Exception, expected: type[UpstreamError], status: int, kind: str
) -> None:
    assert isinstance(exc, UPSTREAM_FAILURES)
    ours = translate(exc)
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
        UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed"),
        RuntimeError("pool not started"),
        AssertionError(),
        # An OSError that is not a connection's (a file of ours, a permission): not the
        # upstream's doing.  aiohttp wraps socket errors as ClientOSError, listed above.
        PermissionError(errno.EACCES, "permission denied"),
        FileNotFoundError(errno.ENOENT, "no such file"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_anything_else_is_not_an_upstream_failure(exc: Exception) -> None:
    # The handler answers these with a 500 that is never judged; translate refuses them.
    assert not isinstance(exc, UPSTREAM_FAILURES)
    with pytest.raises(TypeError, match="is not an upstream failure"):
        translate(exc)


def test_our_own_errors_pass_unchanged() -> None:
    # UpstreamTimeout is also a TimeoutError, so the table would match it: it is kept.
    ours = UpstreamTimeout("no response within the ring timeout")
    assert translate(ours) is ours
