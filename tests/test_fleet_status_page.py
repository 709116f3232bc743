"""The status page of a fleet member, in a real headless Chromium: it says which member
leads, and that Redis is out of reach while it is (the page's other checks are in
``tests/test_status_page_browser.py``, whose browser fixtures this module reuses)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Upstream
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401 - a fixture
from tests.test_status_page_browser import (  # noqa: F401 - fixtures
    CHROMIUM,
    api,
    browser,
    chromium,
    page_config,
    running,
)

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (.ci/run installs it)")

ROLE = "document.querySelector('[data-field=\"fleet-role\"]')"


async def test_the_page_shows_the_members_role_and_a_lost_redis(
    browser, running, stable: Upstream, canary: Upstream,  # noqa: F811
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    monkeypatch.setenv("FLEET_PAGE_REDIS", redis_server.url)
    text = page_config(stable, canary, tmp_path)
    audit = f'audit: "{tmp_path / "audit.jsonl"}"}}'
    assert text.count(audit) == 1
    text = text.replace(audit, audit[:-1] + ', backend: redis, url: "${FLEET_PAGE_REDIS}", '
                        'lease: 1s}')
    proxy, _ = await running(text, workers=0)
    tab = await browser()
    await tab.goto(proxy.admin_url + "/")
    await tab.wait("document.body.dataset.state === 'ok'", 5)
    await tab.wait(f"{ROLE}.textContent.startsWith('leader')", 10)  # alone: it leads
    fleet = (await api(proxy, "/api/routes"))["fleet"]
    assert await tab.eval(f"{ROLE}.textContent") == f"leader ({fleet['member']})"
    redis_server.stop()
    await tab.wait(f"{ROLE}.textContent.startsWith('REDIS OUT OF REACH')", 15, step=0.2)
    assert await tab.eval(f"{ROLE}.closest('[data-field=\"fleet\"]').hidden") is False
