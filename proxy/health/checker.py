"""One active health check: ``GET path`` to one server on a connection of its own.

The connection is opened for the check and closed after the status line: checks never
borrow (or spoil) the data plane's pooled connections, and a server that accepts
connections but never answers fails by ``timeout``.  Foreign failures become a short word
for people (``refused``, ``timeout``, ``reset``, ``bad response``), never an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from proxy.config.health import HealthCheck
from proxy.config.values import Upstream

USER_AGENT = b"ringproxy-health-check"


def check_request(upstream: Upstream, check: HealthCheck) -> bytes:
    default = 443 if upstream.scheme == "https" else 80
    host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
    if upstream.port != default:
        host = f"{host}:{upstream.port}"
    lines = [f"GET {check.path} HTTP/1.1", f"Host: {host}",
             f"User-Agent: {USER_AGENT.decode()}", "Connection: close",
             *(f"{k}: {v}" for k, v in check.headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def status_of(line: bytes) -> int | None:
    """The status of an HTTP/1.x status line, or None."""
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return None
    status = int(parts[1])
    return status if 100 <= status <= 999 else None


async def probe(upstream: Upstream, check: HealthCheck,
                tls: ssl.SSLContext | None = None,
                server_name: str | None = None) -> tuple[bool, str]:
    """(passed, what was seen): the status, or why there was none.  ``server_name``: the
    TLS name to send and verify instead of the server's host (the pool's tls)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(
                upstream.host, upstream.port, ssl=tls,
                server_hostname=(server_name or upstream.host) if tls is not None else None)
            writer.write(check_request(upstream, check))
            while True:
                line = await reader.readline()
                if not line:
                    return False, "reset"
                status = status_of(line)
                if status is None:
                    return False, "bad response"
                if status >= 200 or status == 101:
                    break
                # An interim 1xx: its head ends with a blank line; the answer follows.
                while (more := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    del more
        lo, hi = check.expect_status
        return lo <= status <= hi, str(status)
    except TimeoutError:
        return False, "timeout"
    except ConnectionRefusedError:
        return False, "refused"
    except (OSError, ssl.SSLError, EOFError, ValueError) as exc:
        return False, "reset" if isinstance(exc, ConnectionError) else type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
