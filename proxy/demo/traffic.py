"""The demo's background traffic: a few hundred sticky users at a bounded rate, to
127.0.0.1 only, for as long as the demo runs.

Each request names its user in ``X-User-Id`` (a few are beta testers) and carries an
``X-Request-Id`` starting with ``demo-traffic-`` so the demo can leave it out of the
access log.  At most ``RATE`` requests start per second and at most ``MAX_IN_FLIGHT``
are open: a slow or broken proxy gets fewer requests, never a pile-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from urllib.parse import urlsplit

import aiohttp

USERS = 300
BETA_USERS = 10  # user-001 .. user-010 send X-Beta: true
RATE = 40.0  # requests started per second
MAX_IN_FLIGHT = 50
PATHS = ("/api/items", "/api/cart", "/api/checkout", "/api/profile")
PREFIX = "demo-traffic-"


class Traffic:
    def __init__(self, url: str, rate: float = RATE, users: int = USERS) -> None:
        host = urlsplit(url).hostname
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"the demo's traffic goes to loopback only, not {url}")
        self.url = url
        self.rate = rate
        self.users = [f"user-{i:03d}" for i in range(1, users + 1)]
        self.sent = 0
        self.failed = 0
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    @staticmethod
    def is_ours(request_id: str) -> bool:
        return request_id.startswith(PREFIX)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
        timeout = aiohttp.ClientTimeout(total=10)
        # trust_env=False: loopback only, whatever http_proxy says.
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                         cookie_jar=aiohttp.DummyCookieJar()) as session:
            loop = asyncio.get_running_loop()
            next_at = loop.time()
            try:
                while True:
                    next_at += 1.0 / self.rate
                    await asyncio.sleep(max(0.0, next_at - loop.time()))
                    next_at = max(next_at, loop.time() - 1.0)  # no burst after a stall
                    if len(self._in_flight) >= MAX_IN_FLIGHT:
                        continue
                    task = asyncio.ensure_future(self._one(session))
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
            finally:
                for task in list(self._in_flight):
                    task.cancel()
                await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _one(self, session: aiohttp.ClientSession) -> None:
        user = random.choice(self.users)
        headers = {"X-User-Id": user, "X-Request-Id": f"{PREFIX}{next(self._ids)}"}
        if int(user[5:]) <= BETA_USERS:
            headers["X-Beta"] = "true"
        try:
            async with session.get(self.url + random.choice(PATHS), headers=headers) as r:
                await r.read()
                self.sent += 1
        except (aiohttp.ClientError, TimeoutError):
            self.failed += 1

    def __repr__(self) -> str:
        return (f"<Traffic {self.url} {self.rate:g}/s sent={self.sent} failed={self.failed} "
                f"in_flight={len(self._in_flight)}>")
