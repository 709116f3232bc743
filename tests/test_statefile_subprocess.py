"""``ringproxy run`` (a real subprocess) with damaged state and audit files, and with a
saved entry that cannot be matched to its ring: one line and exit 1, or with
``--fresh-state`` the file set aside and a fresh start; an unmatched rolled-back ring is
never served."""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Upstream, cli


def _config(tmp_path: Path, stable: str, canary: str) -> Path:
    path = tmp_path / "ringproxy.yaml"
    path.write_text(textwrap.dedent(f"""
        listen: 127.0.0.1:0
        admin: {{listen: 127.0.0.1:0}}
        access_log: {{enabled: false}}
        drain_delay: 0s
        shutdown_grace: 2s
        state: {{path: "{tmp_path / 'state.json'}", audit: "{tmp_path / 'audit.jsonl'}"}}
        pools:
          stable: {{servers: ["{stable}"]}}
          canary: {{servers: ["{canary}"]}}
        routes:
          - name: api
            sticky: {{key: ["header:X-User-Id"]}}
            rings:
              - {{name: canary, pool: canary, weight: 50}}
              - {{name: stable, pool: stable}}
    """))
    return path


DAMAGE = {
    "state-utf8": ("state.json", b'{"format": 1, "routes": {"\xff": {}}}',
                   "the state file is not UTF-8 text"),
    "state-json": ("state.json", b'{"format": 1, "routes": ', "the state file is corrupt"),
    "audit-utf8": ("audit.jsonl", b'{"kind": "pause"}\n\xfe\xff\n',
                   "the audit file is not UTF-8 text"),
    "audit-json": ("audit.jsonl", b'{"kind": "pause"}\n{"kind": \n{"kind": "resume"}\n',
                   "audit.jsonl:2: the audit file is corrupt"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
async def test_a_damaged_file_is_one_line_and_exit_1_or_set_aside_with_fresh_state(
    case: str, spawn, stable: Upstream, canary: Upstream, tmp_path: Path,
) -> None:
    name, content, message = DAMAGE[case]
    damaged = tmp_path / name
    damaged.write_bytes(content)
    config = _config(tmp_path, stable.url, canary.url)
    result = cli("run", "--config", str(config))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert message in lines[0] and "--fresh-state" in lines[0]
    assert damaged.read_bytes() == content  # nothing lost
    proxy = await spawn("run", "--config", str(config), "--fresh-state")
    await proxy.wait_listening()
    async with aiohttp.ClientSession() as client, client.get(proxy.url + "/x") as r:
        assert r.status == 200
    code, _, err = await proxy.finish(signal.SIGTERM)
    assert code == 0, err
    aside = _set_aside(tmp_path, name)
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert f"the old file is kept as {aside[0]}" in err
    assert "Traceback" not in err


def _set_aside(folder: Path, name: str) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(f"{name}.corrupt-")]


async def test_a_rolled_back_entry_without_fingerprint_keeps_its_ring_rolled_back(
    spawn, stable: Upstream, canary: Upstream, tmp_path: Path,
) -> None:
    config = _config(tmp_path, stable.url, canary.url)
    (tmp_path / "state.json").write_text(json.dumps({"format": 1, "routes": {"api": {
        "canary": {"phase": "rolled_back", "weight": 0, "step_since": 1.0}}}}))
    proxy = await spawn("run", "--config", str(config))
    await proxy.wait_listening()
    async with aiohttp.ClientSession() as client:
        for i in range(60):
            async with client.get(proxy.url + "/x", headers={"X-User-Id": f"u{i}"}) as r:
                assert r.status == 200
                assert (await r.json())["upstream"] == "stable"
    code, _, err = await proxy.finish(signal.SIGTERM)
    assert code == 0, err
    assert canary.requests == []
    assert ("ringproxy api/canary kept_rolled_back (rolled_back): its saved state has no "
            "fingerprint to match it") in err
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["ring"], e["kind"], e["actor"]) for e in audit] == [
        ("canary", "kept_rolled_back", "restore")]
    # Saved again bound to the ring's config: the next start matches it, silently.
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["routes"]["api"]["canary"]["fingerprint"]
    proxy = await spawn("run", "--config", str(config))
    await proxy.wait_listening()
    code, _, err = await proxy.finish(signal.SIGTERM)
    assert code == 0 and "kept_rolled_back" not in err
