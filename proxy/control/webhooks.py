"""Rollout events to webhooks: JSON POSTs from a background task, never the request path.

Each event is POSTed to every configured URL as its JSON form plus a human ``text`` field
(what Slack-style receivers show).  A failed POST (error, timeout, or a non-2xx answer) is
retried ``retries`` times with backoff (0.5 s, 1 s, 2 s, ...).  The queue holds at most
1,000 events; when a receiver is down for long, the oldest are dropped (and logged).
A sender being replaced (a reload changed the webhooks) is ``close``d: it posts what it
has queued, for a bounded time, then drops the rest with a log line.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING

import aiohttp

from proxy.config.checks import shown_url
from proxy.tasks import cancel_and_wait

if TYPE_CHECKING:
    from proxy.config.rollout import Webhook
    from proxy.rollout.state import Event

log = logging.getLogger("ringproxy.webhooks")
QUEUE_LIMIT = 1000


class WebhookSender:
    def __init__(self, hooks: tuple[Webhook, ...], backoff: float = 0.5) -> None:
        self.hooks = hooks
        self.backoff = backoff  # seconds before the first retry; doubled after each
        self._queue: collections.deque[Event] = collections.deque(maxlen=QUEUE_LIMIT)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set while nothing is queued or being posted
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def send(self, event: Event) -> None:
        if not self.hooks:
            return
        if len(self._queue) == QUEUE_LIMIT:
            log.warning("webhook queue full: dropping the oldest event")
        self._queue.append(event)
        self._idle.clear()
        self._wake.set()

    def start(self) -> None:
        if self.hooks and self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def close(self, limit: float) -> None:
        """Stop once everything queued is posted, or after ``limit`` seconds: what is not
        posted by then is dropped, and a warning says how much."""
        if self._task is not None:
            try:
                async with asyncio.timeout(limit):
                    await self._idle.wait()
            except TimeoutError:
                pass
        if not self._idle.is_set():
            in_flight = 1 if self._task is not None else 0  # popped, its posts not done
            log.warning("webhooks %s closed: %d event(s) not posted within %gs dropped",
                        ", ".join(shown_url(h.url) for h in self.hooks),
                        len(self._queue) + in_flight, limit)
        await self.stop()

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    event = self._queue.popleft()
                    body = {**event.as_dict(), "text": event.text}
                    await asyncio.gather(*(self._post(session, hook, body) for hook in self.hooks))
                self._idle.set()

    async def _post(self, session: aiohttp.ClientSession, hook: Webhook, body: object) -> None:
        for attempt in range(hook.retries + 1):
            try:
                async with session.post(
                    hook.url, json=body, timeout=aiohttp.ClientTimeout(total=hook.timeout)
                ) as resp:
                    if 200 <= resp.status < 300:
                        return
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                # A webhook's path or query often holds its secret: never logged.
                problem = f"{type(exc).__name__}: {str(exc).replace(hook.url, '...')}"
            if attempt < hook.retries:
                await asyncio.sleep(self.backoff * 2**attempt)
        log.warning("webhook %s failed after %d attempts (%s)", shown_url(hook.url),
                    hook.retries + 1,
                    problem)

    def __repr__(self) -> str:
        return f"<WebhookSender hooks={len(self.hooks)} queued={len(self._queue)}>"
