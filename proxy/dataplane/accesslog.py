"""The access log: one JSON object per line, per request (its fields: ``FIELDS``, README's
"Access log" says what each one means; names and order are stable).

Everything a client sent (path, host, user agent, request id) goes through the JSON
encoder's string escaping: control characters cannot split or forge a line.

Lines are buffered and written in batches (every 200 ms, or at 256 lines), so the request
path never waits on a write of its own.  The write itself is a plain blocking write to a
file or standard output; a stalled pipe on stdout therefore stalls the flush, as with
NGINX's buffered access log.  ``path: "-"`` is standard output.

With ``workers: N`` every worker process writes its own lines to the same file or pipe: a
batch is written in chunks of whole lines of at most ``PIPE_BUF`` (4,096) bytes, one
``write`` each, which a pipe (and a file opened for appending) never interleaves with
another process's write; a longer line is written alone.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _string  # C; as json.dumps writes a str
from typing import IO, Any, Final

# One field's value: the access log writes flat objects of JSON scalars.
Field = str | int | float | None

_FLUSH_EVERY: Final = 0.2
_FLUSH_LINES: Final = 256
_ATOMIC: Final = 4096  # PIPE_BUF on Linux: a write of at most this many bytes is never split


def _iso(ts: float) -> str:
    t = time.gmtime(ts)
    return (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:{t.tm_min:02d}:"
            f"{t.tm_sec:02d}.{int(ts % 1 * 1000):03d}Z")


# The client's fields, as printed, by their values (few clients send most requests).
_CLIENT_FIELDS: Final = '"client":%s,"method":%s,"host":%s,"protocol":%s,"user_agent":%s'

# The fields a request shares with many others (the decision's: route to upstream), as
# printed, by their values: formatted once per combination, not per request.
_DECISION_FIELDS: Final = '"route":%s,"ring":%s,"reason":%s,"bucket":%s,"pool":%s,"upstream":%s'
_DECISIONS_MAX: Final = 4096
# A User-Agent is logged up to this many bytes (a client can send 32 KiB of it, escaped up
# to 6x: cached 4,096 times that would be hundreds of MiB); a longer one ends in "...".
USER_AGENT_MAX: Final = 512
# The client fields of a request are cached (and reused) only when host and User-Agent
# are this short together: the cache holds at most _DECISIONS_MAX * ~6 KiB.
_CACHED_CLIENT_MAX: Final = 1024

# The order of a request line's fields (README: Access log), for ``log`` and the tests.
FIELDS: Final = (
    "time", "request_id", "client", "method", "host", "protocol", "user_agent", "path",
    "status", "duration_ms", "upstream_ms", "route", "ring", "reason", "bucket", "pool",
    "upstream", "bytes_in", "bytes_out", "error", "revision",
)


# "000" to "999": the three decimals of a millisecond figure, by index (no formatting).
_DECIMALS: Final = tuple(str(1000 + n)[1:] for n in range(1000))


def _millis(ms: float) -> str:
    """Milliseconds with three decimals (microseconds, rounded half up), as ``%.3f`` of a
    non-negative number prints them, from integers: a float's formatting costs more."""
    if not 0.0 <= ms < 1e15:  # (never: durations are monotonic; NaN or beyond, as %.3f)
        return f"{ms:.3f}"
    us = int(ms * 1000.0 + 0.5)
    return f"{us // 1000}.{_DECIMALS[us % 1000]}"


def _opt(value: str | None) -> str:
    return "null" if value is None else _string(value)


def _client_fields(client: str, method: str, host: str, protocol: str,
                   user_agent: bytes | None) -> str:
    """The client part of a line; a User-Agent longer than USER_AGENT_MAX is cut there."""
    if user_agent is None:
        agent = "null"
    elif len(user_agent) > USER_AGENT_MAX:
        agent = _string(user_agent[:USER_AGENT_MAX].decode("latin-1") + "...")
    else:
        agent = _string(user_agent.decode("latin-1"))
    return _CLIENT_FIELDS % (_string(client), _string(method), _string(host),
                             _string(protocol), agent)


def _chunks(lines: list[str]) -> list[str]:
    """``lines`` (ASCII, each ending with a newline) joined into chunks of at most
    ``_ATOMIC`` bytes, never splitting a line (a longer line is a chunk of its own)."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        if current and size + len(line) > _ATOMIC:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append("".join(current))
    return chunks


class AccessLog:
    def __init__(self, path: str) -> None:
        self.path = path
        # A file is written in binary (the lines are ASCII: every string in them is JSON-
        # escaped), without a text layer's encoding pass; standard output as it is.
        self._binary = path != "-"
        self._stream: IO[Any] = (
            sys.stdout if path == "-" else open(path, "ab")  # noqa: SIM115
        )
        self._buffer: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._dumps = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode
        self._second = -1  # the second _stamp is for
        self._stamp = ""  # its ISO form up to the seconds
        self._decisions: dict[tuple[str | int | None, ...], str] = {}
        self._revisions: dict[str, str] = {}
        self._clients: dict[tuple[str, str, str | bytes, str, bytes | None], str] = {}
        self._last_client: tuple[str, str, str | bytes, str, bytes | None] | None = None
        self._last_fields = ""
        # Requests whose id this says yes to are not logged (the demo's background traffic).
        self.skip: Callable[[str], bool] | None = None

    def log(self, fields: dict[str, Field]) -> None:
        """Queue one line; ``fields["time"]`` is set here (put it first to print it first)."""
        fields["time"] = _iso(time.time())
        self._buffer.append(self._dumps(fields) + "\n")
        if len(self._buffer) >= _FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_FLUSH_EVERY, self.flush)

    def log_request(
        self, request_id: str, client: str, method: str, host: str | bytes, protocol: str,
        user_agent: bytes | None, path: str, status: int, duration_ms: float,
        upstream_ms: float | None, route: str | None, ring: str | None, reason: str | None,
        bucket: int | None, pool: str | None, upstream: str | None, bytes_in: int,
        bytes_out: int, error: str | None, revision: str, plain_id: bool = False,
    ) -> None:
        """Queue one request's line (what ``log`` writes for these fields, faster).

        ``host`` may be the Host header's bytes and ``user_agent`` is the header's bytes as
        they came (both read as Latin-1, escaped like every string); ``upstream_ms`` None:
        no response head came from an upstream; ``plain_id``: the caller vouches that
        ``request_id`` needs no JSON escaping (the data plane's ids: generated hex, or a
        client's that matched ``request_id_ok``'s characters)."""
        if self.skip is not None and self.skip(request_id):
            return
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = _iso(second)[:-5]  # without ".mmmZ"
        key = (route, ring, reason, bucket, pool, upstream)
        decision = self._decisions.get(key)
        if decision is None:
            if len(self._decisions) >= _DECISIONS_MAX:
                self._decisions.clear()
            decision = self._decisions[key] = _DECISION_FIELDS % (
                _opt(route), _opt(ring), _opt(reason), "null" if bucket is None else bucket,
                _opt(pool), _opt(upstream))
        who = (client, method, host, protocol, user_agent)
        if who == self._last_client:
            # The previous request's client (a connection's requests come together):
            # compared, not hashed (its host and User-Agent are new objects every time).
            fields = self._last_fields
        else:
            cached = self._clients.get(who)
            if cached is None:
                name = host if isinstance(host, str) else host.decode("latin-1")
                fields = _client_fields(client, method, name, protocol, user_agent)
                if len(host) + (0 if user_agent is None else len(user_agent)) \
                        <= _CACHED_CLIENT_MAX:
                    if len(self._clients) >= _DECISIONS_MAX:
                        self._clients.clear()
                    self._clients[who] = fields
            else:
                fields = cached
            self._last_client = who
            self._last_fields = fields
        rev = self._revisions.get(revision)
        if rev is None:
            if len(self._revisions) >= 64:
                self._revisions.clear()
            rev = self._revisions[revision] = _string(revision)
        rid = f'"{request_id}"' if plain_id else _string(request_id)
        up = "null" if upstream_ms is None else _millis(upstream_ms)
        err = "null" if error is None else _string(error)
        # An f-string of strings and ints: one allocation, no format to parse (compiled,
        # each int is a C conversion).  (now - second: exact, as now % 1, without a float
        # modulo.)
        line = (f'{{"time":"{self._stamp}.{_DECIMALS[int((now - second) * 1000)]}Z",'
                f'"request_id":{rid},{fields},"path":{_string(path)},'
                f'"status":{status},"duration_ms":{_millis(duration_ms)},"upstream_ms":{up},'
                f'{decision},"bytes_in":{bytes_in},"bytes_out":{bytes_out},"error":{err},'
                f'"revision":{rev}}}\n')
        self._buffer.append(line)
        if len(self._buffer) >= _FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_FLUSH_EVERY, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._buffer:
            lines, self._buffer = self._buffer, []
            try:
                for chunk in _chunks(lines):
                    self._stream.write(chunk.encode("ascii") if self._binary else chunk)
                    self._stream.flush()  # one write(2) per chunk
            except (OSError, ValueError):
                pass  # a closed stdout must not take requests down with it

    def close(self) -> None:
        self.flush()
        if self._stream is not sys.stdout:
            self._stream.close()

    def __repr__(self) -> str:
        return f"<AccessLog {self.path} buffered={len(self._buffer)}>"
