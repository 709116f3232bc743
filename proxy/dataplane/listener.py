"""The listening side of the data plane: file descriptors, the connection cap, TLS, sockets.

At start the proxy raises its soft ``RLIMIT_NOFILE`` to the hard limit
(``raise_nofile_limit``) and sizes one ``ConnectionGate`` for the process from it
(``connection_cap``): a client connection over the cap is closed as soon as it is
accepted, so a flood of idle sockets cannot take the descriptors that upstream
connections, the admin listener and files need.  When the process still runs out (the
reserve is an estimate, not a guarantee) the event loop backs off accepting by itself:
asyncio pauses accept for a second on EMFILE/ENFILE, libuv (uvloop) accepts and closes
the pending connections with a descriptor it keeps in reserve.

``CertificateWatcher`` holds the TLS listener's context and swaps in the certificate files'
new contents when they change; ``listen`` binds one address; ``bind_shared`` makes the
listening sockets of ``workers: N`` (one per worker and address, SO_REUSEPORT, after a
check that nobody else holds the port) and ``serve_socket`` serves one of them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import ssl
from collections.abc import Callable

from proxy.config.limits import Limits, ListenTLS, load_certificate
from proxy.config.values import Listen
from proxy.errors import ConfigError, ConfigIssue

log = logging.getLogger("ringproxy.listener")

# Descriptors kept out of the client connections' share whatever the limit: the listeners,
# the admin listener and its clients, the access log, the state and config files, the
# event loop's own (epoll, signals), and a few upstream connections.
MIN_RESERVE = 64
# Where the hard limit is "unlimited" (macOS; Linux never has it for RLIMIT_NOFILE):
# what the soft limit is raised to, and what an unlimited soft limit counts as.
UNLIMITED_NOFILE = 1 << 20


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return ``(soft, hard)`` after.

    The default soft limit (often 1,024) is a guard for programs that use ``select()``;
    an event loop on epoll/kqueue has no use for it, and an edge proxy needs one
    descriptor per client plus one per upstream connection.  Raising the soft limit up to
    the hard one needs no privilege.  A refusal (a platform that caps it lower) keeps the
    soft limit and logs a warning.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_NOFILE if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit (RLIMIT_NOFILE) from %d to %d: "
                        "%s", soft, target, exc)
        else:
            log.info("raised the open files limit (RLIMIT_NOFILE) from %d to %d", soft, target)
            soft = target
    return soft, hard


def connection_cap(limits: Limits, soft_nofile: int) -> int:
    """How many client connections the process admits at once.

    ``limits.max_connections`` when set, refused (``ConfigError``) when it leaves fewer than
    ``MIN_RESERVE`` descriptors for everything else.  Otherwise three quarters of the soft
    limit: ``soft - max(MIN_RESERVE, soft // 4)``, 768 of 1,024, 786,432 of 1,048,576.

    Why a quarter: most client connections at any moment are idle keep-alive connections or
    waiting for a body, holding no upstream connection, and active requests share the
    pools' keep-alive connections; a quarter of the descriptors covers those upstream
    connections, with NGINX's per-worker ``worker_connections`` (clients and upstreams
    counted together) as the comparison.  Half (one upstream per client, always) would
    turn away idle clients for a case the pools' ``max_connections`` already bound.
    """
    soft = UNLIMITED_NOFILE if soft_nofile == resource.RLIM_INFINITY else soft_nofile
    most = soft - MIN_RESERVE
    if limits.max_connections is not None:
        if limits.max_connections > most:
            raise ConfigError([ConfigIssue(
                "limits.max_connections",
                f"{limits.max_connections} client connections leave too few file descriptors "
                f"for upstream connections, the admin listener and files: the open files "
                f"limit (RLIMIT_NOFILE) is {soft}, so at most {max(most, 0)}; raise the limit "
                f"(ulimit -n, LimitNOFILE= in systemd) or lower max_connections")])
        return limits.max_connections
    cap = soft - max(MIN_RESERVE, soft // 4)
    if cap < 1:
        raise ConfigError([ConfigIssue(
            "limits", f"the open files limit (RLIMIT_NOFILE) is {soft}: too low to serve "
            f"clients ({MIN_RESERVE} are kept for the proxy itself); raise it (ulimit -n)")])
    return cap


class ConnectionGate:
    """Counts the open client connections of the process against one cap.

    One per process, shared by the listeners: the connection's protocol calls ``admit()``
    when it is made (``False``: close it at once, unanswered) and ``release()`` when it is
    lost, only if it was admitted.
    """

    __slots__ = ("cap", "open", "refused")

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"a connection cap of {cap} admits nobody")
        self.cap = cap
        self.open = 0  # admitted and not yet released
        self.refused = 0  # turned away since start: for metrics and the status page

    def admit(self) -> bool:
        if self.open >= self.cap:
            self.refused += 1
            return False
        self.open += 1
        return True

    def release(self) -> None:
        # Never below zero: a release without its admit must not raise the cap.
        if self.open > 0:
            self.open -= 1

    def __repr__(self) -> str:
        return f"<ConnectionGate open={self.open}/{self.cap} refused={self.refused}>"


Stamp = tuple[int, int, int] | None  # (mtime_ns, size, inode) of a file; None: unreadable


def _stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)  # follows symlinks: a swapped link (Kubernetes, certbot) counts
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def server_context() -> ssl.SSLContext:
    """A server context as the TLS listener uses it, without a certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated renegotiation costs the server a handshake per request of it.
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])  # never h2: the data plane speaks HTTP/1.1
    return context


def _loaded(tls: ListenTLS) -> ssl.SSLContext:
    context = server_context()
    load_certificate(context, tls.cert, tls.key)
    return context


class CertificateWatcher:
    """The TLS listener's context, with the certificate files reloaded when they change.

    ``context`` is the one object the listener holds for its lifetime.  A reload loads
    the files into a fresh context and each new handshake switches to it (the context's
    ``sni_callback`` runs on every ClientHello, with or without SNI): loading into the
    listener's own context instead could leave it half-changed on a bad pair (OpenSSL
    sets a new certificate before checking the key), or serving the old certificate
    beside the new one when the key type changes.  Open connections keep theirs.
    """

    def __init__(self, tls: ListenTLS) -> None:
        self.tls = tls
        self._loaded_stamp = self._stamps()
        self._failed_stamp: tuple[Stamp, Stamp] | None = None
        try:
            self._current = _loaded(tls)
            self.context = _loaded(tls)
        except ValueError as exc:
            raise ConfigError([ConfigIssue("listen_tls", str(exc))]) from exc
        self.context.sni_callback = self._switch
        self.reloads = 0  # successful reloads since start

    @property
    def current(self) -> ssl.SSLContext:
        """The context new handshakes use: the last pair that loaded."""
        return self._current

    def _stamps(self) -> tuple[Stamp, Stamp]:
        return (_stamp(self.tls.cert), _stamp(self.tls.key))

    def _switch(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                context: ssl.SSLContext) -> None:
        if conn.context is not self._current:
            conn.context = self._current

    def check(self) -> bool:
        """Reload if the cert or key file changed (mtime, size, inode); True if reloaded.

        A pair that does not load is logged at warning once per change of the files, and
        the previous one kept.  Cheap (two ``stat`` calls) when nothing changed.
        """
        stamps = self._stamps()  # before loading: a change during the load is seen next time
        if stamps == self._loaded_stamp or stamps == self._failed_stamp:
            return False
        try:
            context = _loaded(self.tls)
        except ValueError as exc:
            self._failed_stamp = stamps
            log.warning("listen_tls: the changed certificate files do not load (%s); "
                        "still serving the previous certificate", exc)
            return False
        self._current = context
        self._loaded_stamp, self._failed_stamp = stamps, None
        self.reloads += 1
        log.info("listen_tls: reloaded the certificate %s and key %s",
                 self.tls.cert, self.tls.key)
        return True

    def __repr__(self) -> str:
        return f"<CertificateWatcher {self.tls.cert} reloads={self.reloads}>"


async def listen(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    listen: Listen,
    ssl: ssl.SSLContext | None,
    backlog: int = 1024,
    *,
    handshake_timeout: float | None = None,
) -> asyncio.Server:
    """Bind ``listen`` and serve; ``OSError`` names the address (in use, not permitted...).

    ``handshake_timeout`` bounds a TLS handshake (asyncio's default is 60 s); pass
    ``limits.head_timeout``, since the head timeout starts only once the handshake is done.
    """
    try:
        return await loop.create_server(
            protocol_factory, host=listen.host, port=listen.port, ssl=ssl, backlog=backlog,
            reuse_address=True,
            ssl_handshake_timeout=handshake_timeout if ssl is not None else None,
        )
    except OSError as exc:
        what = "TLS " if ssl is not None else ""
        raise OSError(exc.errno, f"cannot listen for {what}clients on {listen}: "
                      f"{exc.strerror or exc}") from exc


async def serve_socket(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    sock: socket.socket,
    ssl: ssl.SSLContext | None,
    backlog: int = 1024,
    *,
    handshake_timeout: float | None = None,
) -> asyncio.Server:
    """Serve on ``sock``, a listening socket made by ``bind_shared`` (a worker's)."""
    return await loop.create_server(
        protocol_factory, sock=sock, ssl=ssl, backlog=backlog,
        ssl_handshake_timeout=handshake_timeout if ssl is not None else None,
    )


def _claim(family: int, addr: tuple[object, ...], shared: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # as asyncio does: [::] does not take 0.0.0.0 too
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


async def bind_shared(listen: Listen, count: int, tls: bool = False,
                      backlog: int = 1024) -> list[list[socket.socket]]:
    """``count`` listening sockets per address of ``listen`` (``[worker][address]``), all
    on one port with SO_REUSEPORT: the kernel spreads new connections over them.

    First the port must be free: every address is bound without SO_REUSEPORT (what
    ``listen`` does for ``workers: 1``), so a second ringproxy on the port fails here with
    EADDRINUSE instead of joining the first one's group; those checks are closed and the
    shared sockets bound at once (port 0 becomes the port the first check got, for every
    address).  Names are resolved without blocking; every address is bound, as
    ``loop.create_server`` does.  The one who calls owns the sockets (and closes them).
    """
    what = "TLS " if tls else ""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(listen.host or None, listen.port,
                                       type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen for {what}clients on {listen}: "
                      f"{exc.strerror or exc}") from exc
    addresses: list[tuple[int, tuple[object, ...]]] = []
    for info in infos:
        found = (int(info[0]), tuple(info[4]))
        if found not in addresses:
            addresses.append(found)
    made: list[socket.socket] = []
    try:
        port = listen.port
        for af, addr in addresses:
            check = _claim(af, (addr[0], port, *addr[2:]), shared=False)
            made.append(check)
            port = check.getsockname()[1]
        for check in made:
            check.close()
        made.clear()
        out: list[list[socket.socket]] = []
        for _ in range(count):
            mine = []
            for af, addr in addresses:
                sock = _claim(af, (addr[0], port, *addr[2:]), shared=True)
                made.append(sock)
                sock.listen(backlog)
                mine.append(sock)
            out.append(mine)
    except OSError as exc:
        for sock in made:
            sock.close()
        hint = ("; is another ringproxy running on it?"
                if exc.errno == errno.EADDRINUSE else "")
        raise OSError(exc.errno, f"cannot listen for {what}clients on {listen}: "
                      f"{exc.strerror or exc}{hint}") from exc
    return out
