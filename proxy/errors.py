"""The one exception tree of ringproxy.

    RingproxyError
    ├── ConfigError (ValueError)            a config file that cannot be served
    └── UpstreamError                       a request that got no usable upstream answer
        ├── UpstreamConnectError            502  connect refused / unreachable / DNS
        ├── UpstreamResetError              502  connection reset or closed early
        ├── UpstreamBadResponse             502  malformed status line, headers or body
        ├── UpstreamTimeout (TimeoutError)  504  no response headers within the ring timeout
        └── Overloaded                      503  ring max_concurrency full, or no server

Every UpstreamError carries the HTTP status it maps to and a `kind` from a fixed set
(the label value metrics use).  Foreign exceptions (aiohttp, OSError) are translated
once, at the pool boundary, with ``raise ... from exc``.
"""

from __future__ import annotations

from dataclasses import dataclass


class RingproxyError(Exception):
    """Root of every error ringproxy raises on purpose."""


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


class UpstreamError(RingproxyError):
    status: int = 502
    kind: str = "bad_response"
    reason: str = "bad gateway"

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


class Overloaded(UpstreamError):
    status = 503
    kind = "overload"
    reason = "ring is at its concurrency limit"
