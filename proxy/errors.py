"""The one exception tree of ringproxy.

    RingproxyError                          500  (the status each error maps to)
    ├── ConfigError (ValueError)            a config file that cannot be served
    ├── StateError                          the rollout state file exists but cannot be used
    ├── RolloutConflict                409  an action that does not apply to the ring's phase
    ├── ApiError                     4xx   an admin API request refused (its own status)
    ├── AdminClientError                    a call to the admin API failed (CLI, SDK)
    └── UpstreamError                       a request that got no usable upstream answer
        ├── UpstreamConnectError       502  connect refused / unreachable / DNS
        ├── UpstreamResetError         502  connection reset or closed early
        ├── UpstreamBadResponse        502  malformed status line, headers or body
        ├── UpstreamTimeout (TimeoutError)
        │   │                          504  no response headers within the ring timeout
        │   └── UpstreamConnectTimeout 504  the connect took longer than connect_timeout
        └── Overloaded                 503  ring max_concurrency full, or no server

Every UpstreamError carries the HTTP status it maps to and a `kind` from a fixed set
(the label value metrics use).  Foreign exceptions (aiohttp, OSError, timeouts) are
translated once, at the pool boundary, from one table, with ``raise ... from exc``.
Anything else on the upstream path is a defect of the proxy, not of the upstream: a 500
(or a cut response), logged with its traceback, counted as ``internal`` and never judged
against the ring's version.
"""

from __future__ import annotations

from dataclasses import dataclass


class RingproxyError(Exception):
    """Root of every error ringproxy raises on purpose."""

    status: int = 500  # the HTTP status it maps to where one applies


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file: where it is and what is wrong."""

    path: str
    message: str
    line: int | None = None

    def format(self, source: str = "") -> str:
        where = source
        if self.line is not None:
            where = f"{source}:{self.line}" if source else f"line {self.line}"
        prefix = f"{where}: " if where else ""
        location = f"{self.path}: " if self.path else ""
        return f"{prefix}{location}{self.message}"


class ConfigError(RingproxyError, ValueError):
    """A config that cannot be served; holds every issue found, not just the first."""

    def __init__(self, issues: list[ConfigIssue], source: str = "") -> None:
        self.issues = list(issues)
        self.source = source
        super().__init__("\n".join(i.format(source) for i in self.issues))


class StateError(RingproxyError):
    """The state file exists but cannot be used (the proxy refuses to start on it)."""


class RolloutConflict(RingproxyError):
    """An action that does not apply to the ring's current phase."""

    status = 409


class ApiError(RingproxyError):
    """An admin API request refused; answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AdminClientError(RingproxyError):
    """A call to a running proxy's admin API failed (one line for the user); ``http_status``
    is the API's answer (412, 409, ...), None when there was none."""

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status


class UpstreamError(RingproxyError):
    status: int = 502
    kind: str = "bad_response"
    reason: str = "bad gateway"
    # The server's failure (counted toward its outlier ejection); False for the proxy's
    # own refusals.
    server_fault: bool = True

    def __init__(self, detail: str = "") -> None:
        self.detail = detail
        super().__init__(detail or self.reason)


class UpstreamConnectError(UpstreamError):
    status = 502
    kind = "connect"
    reason = "upstream connect error"


class UpstreamResetError(UpstreamError):
    status = 502
    kind = "reset"
    reason = "upstream connection reset"


class UpstreamBadResponse(UpstreamError):
    status = 502
    kind = "bad_response"
    reason = "upstream sent a malformed response"


class UpstreamTimeout(UpstreamError, TimeoutError):
    status = 504
    kind = "timeout"
    reason = "upstream timed out"


class UpstreamConnectTimeout(UpstreamTimeout):
    status = 504
    kind = "connect"
    reason = "upstream connect timed out"


class Overloaded(UpstreamError):
    status = 503
    kind = "overload"
    reason = "ring is at its concurrency limit"
    server_fault = False


class PoolExhausted(Overloaded):
    """No connection of the pool came free within its connect timeout: the proxy's own
    refusal (503 with Retry-After), like a full ``max_concurrency``; never blamed on a
    server nor judged against the ring's version."""

    reason = "no free upstream connection"
