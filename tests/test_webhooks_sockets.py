"""The webhook sender against real receivers: aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from proxy.config import parse_config
from proxy.config.rollout import Webhook
from proxy.control.controller import Controller
from proxy.control.webhooks import WebhookSender
from proxy.metrics import Metrics
from proxy.rollout.machine import Trigger
from proxy.rollout.state import Event
from proxy.runtime import Runtime

Answer = Callable[[int], Awaitable[web.Response]]


class Receiver:
    """A webhook receiver: records each POST's body; ``answer`` decides each reply."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, object]] = []
        self.attempts = 0
        self.got = asyncio.Event()
        self.answer: Answer = self.ok
        self.url = ""
        self._runner: web.AppRunner | None = None

    @staticmethod
    async def ok(attempt: int) -> web.Response:
        return web.Response(status=204)

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        response = await self.answer(self.attempts)
        if response.status < 300:
            self.bodies.append(await request.json())
            self.got.set()
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.bodies) < count:
                self.got.clear()
                await self.got.wait()


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[[], Awaitable[Receiver]]]:
    started: list[Receiver] = []

    async def make() -> Receiver:
        receiver = Receiver()
        await receiver.start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        await receiver.stop()


def event(ring: str = "canary", reason: str = "bad deploy") -> Event:
    return Event(1.0, "api", ring, "rollback", 5000, 0, "steady", "rolled_back", reason)


async def test_each_event_is_posted_in_order_with_its_text(receivers) -> None:
    receiver = await receivers()
    sender = WebhookSender((Webhook(receiver.url),))
    sender.start()
    try:
        for ring in ("a", "b", "c"):
            sender.send(event(ring))
        await receiver.wait_for(3)
    finally:
        await sender.stop()
    assert [b["ring"] for b in receiver.bodies] == ["a", "b", "c"]
    body = receiver.bodies[0]
    assert (body["kind"], body["from_weight"], body["to_weight"]) == ("rollback", 50.0, 0.0)
    assert body["text"] == "ringproxy api/a rollback 50% -> 0% (rolled_back): bad deploy"


async def test_a_failing_receiver_is_retried_then_given_up_with_a_log(
    receivers, caplog: pytest.LogCaptureFixture
) -> None:
    flaky, down = await receivers(), await receivers()

    async def fail_twice(attempt: int) -> web.Response:
        return web.Response(status=503 if attempt <= 2 else 204)

    async def always_fail(attempt: int) -> web.Response:
        return web.Response(status=500)

    flaky.answer, down.answer = fail_twice, always_fail
    sender = WebhookSender((Webhook(flaky.url, retries=2), Webhook(down.url, retries=1)),
                           backoff=0.01)
    sender.start()
    with caplog.at_level(logging.WARNING, "ringproxy.webhooks"):
        sender.send(event())
        await sender.close(5)  # returns once both hooks are done with the event
    assert flaky.attempts == 3 and len(flaky.bodies) == 1  # two 503s, then delivered
    assert down.attempts == 2 and down.bodies == []  # retries: 1
    assert down.url.endswith("/hook")  # the path is never logged (it may hold a secret)
    origin = down.url.removesuffix("/hook")
    assert f"webhook {origin} failed after 2 attempts (HTTP 500)" in caplog.text


async def test_close_posts_what_is_queued_first(receivers) -> None:
    receiver = await receivers()
    sender = WebhookSender((Webhook(receiver.url),))
    sender.start()
    for ring in ("a", "b", "c"):
        sender.send(event(ring))
    await sender.close(5)
    assert [b["ring"] for b in receiver.bodies] == ["a", "b", "c"]


async def test_close_drops_what_a_hung_receiver_holds_up_with_a_log(
    receivers, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = await receivers()
    release = asyncio.Event()

    async def hang(attempt: int) -> web.Response:
        await release.wait()
        return web.Response(status=204)

    receiver.answer = hang
    sender = WebhookSender((Webhook(receiver.url, timeout=30),))
    sender.start()
    sender.send(event("a"))
    sender.send(event("b"))
    with caplog.at_level(logging.WARNING, "ringproxy.webhooks"):
        await sender.close(0.2)
    release.set()
    origin = receiver.url.removesuffix("/hook")
    assert f"webhooks {origin} closed: 2 event(s) not posted within 0.2s dropped" in (
        caplog.text)


async def test_set_webhooks_sends_the_next_event_to_the_new_hooks(
    receivers, tmp_path: Path
) -> None:
    old, new = await receivers(), await receivers()
    text = textwrap.dedent(f"""
        state: {{path: "{tmp_path / 'state.json'}", audit: "{tmp_path / 'audit.jsonl'}"}}
        webhooks: ["{old.url}"]
        pools: {{p: {{servers: ["http://127.0.0.1:9"]}}}}
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            rings:
              - {{name: canary, pool: p, weight: 50}}
              - {{name: stable, pool: p}}
    """)
    config = parse_config(text)
    runtime = Runtime(config)
    metrics = Metrics(process_metrics=False)
    metrics.attach(runtime)
    controller = Controller(config, metrics)
    controller.configure(runtime)
    controller.start()
    try:
        await controller.act("api", "canary", Trigger.PAUSE)
        await controller.set_webhooks((Webhook(new.url),))
        await controller.act("api", "canary", Trigger.RESUME)
        await old.wait_for(1)
        await new.wait_for(1)
        await controller.set_webhooks((Webhook(new.url),))  # the same hooks: kept as they are
    finally:
        await controller.stop()
    assert [b["kind"] for b in old.bodies] == ["pause"]
    assert [b["kind"] for b in new.bodies] == ["resume"]
