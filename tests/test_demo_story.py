"""``ringproxy demo`` as a newcomer meets it: a real subprocess started from another
directory, with the virtualenv not on PATH; the lines it prints are run as printed by
``sh`` from yet another directory; the canary is broken and the judge rolls it back.
(Subprocesses and sockets on 127.0.0.1.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(sys.executable).with_name("ringproxy")
pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="no ringproxy console script")


def shell_env() -> dict[str, str]:
    """A user's shell after the README's install: the venv is not activated."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RINGPROXY_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    bindir = str(SCRIPT.parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != Path(bindir).resolve())
    return env


class Demo:
    """A running ``ringproxy demo --ephemeral``; stderr is drained by a thread."""

    def __init__(self, cwd: Path) -> None:
        self.stdout_path = cwd / "stdout.log"
        self._stdout = self.stdout_path.open("wb")
        self.proc = subprocess.Popen(
            [str(SCRIPT), "demo", "--ephemeral"], cwd=cwd, env=shell_env(),
            stdout=self._stdout, stderr=subprocess.PIPE)
        self.stderr = ""
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(30):
            self.proc.kill()
            raise AssertionError(f"the demo did not start: {self.stderr}")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr += raw.decode()
            if "Press Ctrl-C to stop." in self.stderr:
                self._ready.set()
        self._ready.set()

    def banner_line(self, pattern: str) -> str:
        for line in self.stderr.splitlines():
            if re.search(pattern, line):
                return line.strip()
        raise AssertionError(f"no line matches {pattern!r} in:\n{self.stderr}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._stdout.close()
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    running = Demo(tmp_path_factory.mktemp("demo-cwd"))
    try:
        yield running
    finally:
        running.stop()


def sh(script: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run lines as a user pastes them into a POSIX shell (stop at the first failure)."""
    return subprocess.run(["sh", "-ec", script], cwd=cwd, env=shell_env(), text=True,
                          capture_output=True, timeout=timeout)


def get_json(url: str, token: str | None) -> Any:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=5) as response:
        return json.loads(response.read())


def ring_of(routes: Any, name: str) -> dict[str, Any]:
    ring: dict[str, Any] = next(r for r in routes["routes"][0]["rings"] if r["name"] == name)
    return ring


def test_the_demo_prints_a_status_page_link_with_a_token_that_the_api_accepts(
    demo: Demo,
) -> None:
    link = demo.banner_line(r"/#token=")
    page, token = link.split("#token=")
    assert page.startswith("http://127.0.0.1:") and len(token) >= 24
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(page, timeout=5) as answer:
        assert answer.status == 200 and b"<html" in answer.read().lower()
    admin = page.removesuffix("/")
    routes = get_json(admin + "/api/routes", token)
    canary = ring_of(routes, "canary")
    assert canary["phase"] == "progressing" and canary["weight"] == 20
    with pytest.raises(urllib.error.HTTPError) as refused:
        get_json(admin + "/api/routes", None)
    assert refused.value.code == 401
    refused.value.close()
    # the printed commands name this very program: the venv is not on the shell's PATH
    assert shutil.which("ringproxy", path=shell_env()["PATH"]) != str(SCRIPT)
    assert demo.banner_line(r"ringproxy status ").startswith(str(SCRIPT) + " status")


def test_the_printed_commands_run_as_printed_and_a_broken_canary_is_rolled_back(
    demo: Demo, tmp_path: Path
) -> None:
    lines = demo.stderr.splitlines()
    start = lines.index("In another shell (the admin token was generated for this run):")
    block = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        block.append(line.strip())
    assert block[0].startswith("export RINGPROXY_ADMIN_URL=http://127.0.0.1:")
    assert [b.split()[1] for b in block[1:]] == ["status", "explain", "events"]
    # each command's output, one after the other, from a directory that is not the repo
    done = sh("\n".join([block[0], *(f"{b}\necho '-----'" for b in block[1:])]), tmp_path)
    assert done.returncode == 0, done.stderr
    status, explained, events, _ = done.stdout.split("-----\n")
    assert re.search(r"^api\s+canary\s+canary\s+1/1 up\s+20%\s+progressing\s+1/5", status,
                     re.M), status
    decision = json.loads(explained)
    assert decision["ring"] == "canary" and decision["reason"] == "bucket"
    assert events.strip() in ("no events", "") or "TIME" in events

    token = block[0].split("RINGPROXY_ADMIN_TOKEN=")[1]
    admin = block[0].split("RINGPROXY_ADMIN_URL=")[1].split()[0]
    broken_at = time.monotonic()
    broke = sh(demo.banner_line(r"demo-ctl .*break canary"), tmp_path)
    assert broke.returncode == 0, broke.stderr
    assert "is now broken" in broke.stdout
    # the judge rolls it back by itself within seconds (bounded wait)
    deadline = broken_at + 20
    while True:
        canary = ring_of(get_json(admin + "/api/routes", token), "canary")
        if canary["phase"] == "rolled_back" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    took = time.monotonic() - broken_at
    assert canary["phase"] == "rolled_back", canary
    assert canary["weight"] == 0
    assert took < 10
    history = get_json(admin + "/api/events?route=api", token)["events"]
    rollback = next(e for e in history if e["kind"] == "rollback" and e["ring"] == "canary")
    assert rollback["actor"] == "analysis"

    healed = sh(block[0] + "\n" + demo.banner_line(r"demo-ctl .*heal canary"), tmp_path)
    assert healed.returncode == 0, healed.stderr
    after = get_json(admin + "/api/routes", token)
    assert ring_of(after, "canary")["phase"] == "progressing"
    assert ring_of(after, "beta")["phase"] != "rolled_back"

    # the background traffic never reached the access log on stdout, and the demo's own
    # state lives and dies with it (nothing written where it was started)
    code = demo.stop()
    assert code == 0, demo.stderr[-2000:]
    assert demo.stdout_path.read_text() == ""
    assert sorted(p.name for p in demo.stdout_path.parent.iterdir()) == ["stdout.log"]
