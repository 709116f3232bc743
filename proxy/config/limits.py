"""What the proxy accepts from clients (``limits:``) and TLS on the listener (``listen_tls:``).

``Limits`` holds the timeouts and sizes the data plane enforces on every client connection,
with NGINX-like defaults (the README's table names the NGINX directive of each).
``ListenTLS`` names the certificate files; they are loaded here, at config time, so a
config with a missing, mismatched or encrypted key is refused with its line like any
other mistake.  Secrets never live in the file: ``cert`` and ``key`` are paths.

No sockets here: ``proxy.dataplane.listener`` builds the listening sockets, the connection
cap and the certificate watcher from these.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from proxy.config.reader import Ctx, Section
from proxy.config.values import Listen, parse_listen, parse_size

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class Limits:
    # From connection open / end of the previous response to the complete request head
    # -> close (408 if any byte of a head arrived, silently if none).
    head_timeout: float = 10.0
    body_timeout: float = 30.0  # longest silence between reads of a request body -> 408, close
    keepalive_timeout: float = 75.0  # idle keep-alive client connection -> close
    max_request_line: int = 8192  # bytes -> 414, close
    # Bytes of the whole request head -> 431, close; also the upstream response head
    # limit (-> 502).
    max_head_size: int = 32768
    max_headers: int = 100  # header fields -> 431, close (upstream: -> 502)
    # Client connections per process; None: derived from RLIMIT_NOFILE
    # (see proxy.dataplane.listener.connection_cap).
    max_connections: int | None = None
    # Bodies up to this many bytes are read whole before an upstream connection is
    # taken; 0: always stream.
    request_buffer: int = 65536
    underscores_in_headers: bool = False  # False: header names with "_" are dropped
    # A WebSocket (or other upgraded) tunnel with no byte either way for this long is
    # closed, both sides.  NGINX closes one after proxy_read_timeout (60 s) of upstream
    # silence and WebSocket deployments raise it to about an hour; applications that
    # ping (most send one every 20-60 s) never reach it, dead peers are let go.
    tunnel_idle_timeout: float = 3600.0


@dataclass(frozen=True, slots=True)
class ListenTLS:
    listen: Listen
    cert: str  # PEM certificate chain path (the leaf first), relative to the working directory
    key: str  # PEM private key path (unencrypted)


# The bounds of each size and count.  Upper bounds keep one client from costing much
# memory: a head, and a buffered body, are held whole in memory.
HEAD_SIZE_RANGE = (1 * KIB, 1 * MIB)
REQUEST_LINE_RANGE = (256, 1 * MIB)
HEADERS_RANGE = (1, 10_000)
CONNECTIONS_RANGE = (1, 10_000_000)
REQUEST_BUFFER_RANGE = (0, 64 * MIB)
MAX_BODY_RANGE = (1, 1 << 40)

_LIMITS = Limits()


def read_limits(ctx: Ctx, data: object, path: str) -> Limits:
    if data is None:
        return _LIMITS
    sec = Section(ctx, data, path)
    d = _LIMITS
    limits = Limits(
        head_timeout=sec.duration("head_timeout", d.head_timeout),
        body_timeout=sec.duration("body_timeout", d.body_timeout),
        keepalive_timeout=sec.duration("keepalive_timeout", d.keepalive_timeout),
        max_request_line=sec.size("max_request_line", d.max_request_line, *REQUEST_LINE_RANGE),
        max_head_size=sec.size("max_head_size", d.max_head_size, *HEAD_SIZE_RANGE),
        max_headers=sec.integer("max_headers", d.max_headers, *HEADERS_RANGE),
        max_connections=sec.integer("max_connections", d.max_connections, *CONNECTIONS_RANGE),
        request_buffer=sec.size("request_buffer", d.request_buffer, *REQUEST_BUFFER_RANGE),
        underscores_in_headers=sec.flag("underscores_in_headers", d.underscores_in_headers),
        tunnel_idle_timeout=sec.duration("tunnel_idle_timeout", d.tunnel_idle_timeout),
    )
    sec.close()
    if limits.max_request_line > limits.max_head_size:
        ctx.err(sec.sub("max_request_line"),
                f"{limits.max_request_line} bytes is above max_head_size "
                f"({limits.max_head_size} bytes), which includes the request line")
    return limits


def read_max_body(ctx: Ctx, sec: Section) -> int | None:
    """A route's ``max_body``: bytes, or absent for no limit (0 is refused, not "none")."""
    if sec.has("max_body") and _is_zero(sec.data["max_body"]):
        sec.seen.add("max_body")
        ctx.err(sec.sub("max_body"), "0 is not a limit; leave max_body out for no limit "
                "(NGINX's client_max_body_size 0 means unlimited)")
        return None
    return sec.size("max_body", None, *MAX_BODY_RANGE)


def _is_zero(value: object) -> bool:
    try:
        return parse_size(value) == 0
    except ValueError:
        return False


def read_listen_tls(ctx: Ctx, data: object, path: str) -> ListenTLS | None:
    if data is None:
        return None
    sec = Section(ctx, data, path)
    listen = sec.parsed("listen", parse_listen, None)
    if sec.ok and not sec.has("listen"):
        ctx.err(sec.sub("listen"), "is required")
    cert, key = sec.text("cert"), sec.text("key")
    sec.close()
    for name, value in (("cert", cert), ("key", key)):
        if "-----BEGIN" in value:
            ctx.err(sec.sub(name), "write the path of the PEM file, never its contents")
            return None
    if listen is None or not cert or not key:
        return None
    try:
        load_certificate(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)
    except ValueError as exc:
        ctx.err(path, str(exc))
        return None
    return ListenTLS(listen, cert, key)


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> str:
    # Called by OpenSSL only for an encrypted key: without a callback it would prompt on
    # the terminal and block the process.
    raise _EncryptedKey


def load_certificate(context: ssl.SSLContext, cert: str, key: str) -> None:
    """``context.load_cert_chain(cert, key)``; ``ValueError`` with a plain message if not.

    Load into a fresh context: on failure OpenSSL may have set the new certificate and
    dropped the old key, leaving the context unusable.
    """
    for what, file, marker in (("certificate", cert, b"-----BEGIN CERTIFICATE-----"),
                               ("private key", key, b"PRIVATE KEY-----")):
        try:
            with open(file, "rb") as f:
                head = f.read(1 << 20)
        except OSError as exc:
            raise ValueError(f"cannot read the {what} file {file}: {exc.strerror}") from exc
        if marker not in head:
            raise ValueError(f"{file} holds no PEM {what} ({marker.decode()!r} not found)")
    try:
        context.load_cert_chain(cert, key, password=_refuse_password)
    except _EncryptedKey:
        raise ValueError(f"the private key {key} is encrypted; ringproxy takes an unencrypted "
                         "key (readable only by its user), never a passphrase") from None
    except ssl.SSLError as exc:
        # NO_CERTIFICATE_ASSIGNED: a key of another type (an RSA key for an EC certificate).
        if exc.reason in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            raise ValueError(f"the private key {key} does not match the certificate {cert}"
                             ) from exc
        raise ValueError(f"cannot load the certificate {cert} with the key {key}: "
                         f"{exc.reason or exc}") from exc
    except OSError as exc:
        raise ValueError(f"cannot load the certificate {cert} with the key {key}: "
                         f"{exc.strerror or exc}") from exc
