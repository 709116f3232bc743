"""The CLI's side of the admin API: status, rollout actions, events, reload.

Plain ``urllib`` (one request per command, no event loop needed).  Every failure becomes
an ``AdminClientError`` with a one-line message; the CLI prints it and exits 1.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from proxy.errors import AdminClientError

DEFAULT_URL = "http://127.0.0.1:9901"




class AdminClient:
    def __init__(self, url: str, token: str | None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error") or exc.reason
            except ValueError:
                message = exc.reason
            raise AdminClientError(f"{message} (HTTP {exc.code})") from None
        except urllib.error.URLError as exc:
            raise AdminClientError(f"cannot reach the admin API at {self.url}: "
                                   f"{exc.reason}") from None
        except (TimeoutError, ValueError) as exc:
            raise AdminClientError(f"bad answer from the admin API at {self.url}: {exc}") from None

    def status(self) -> Any:
        return self.call("GET", "/api/routes")

    def act(self, route: str, ring: str, action: str, body: dict[str, Any]) -> Any:
        quote = urllib.parse.quote
        return self.call(
            "POST", f"/api/routes/{quote(route, safe='')}/rings/{quote(ring, safe='')}/{action}",
            body)

    def events(self, route: str | None, since: float | None) -> Any:
        query = {k: v for k, v in (("route", route), ("since", since)) if v is not None}
        suffix = "?" + urllib.parse.urlencode(query) if query else ""
        return self.call("GET", "/api/events" + suffix)

    def reload(self) -> Any:
        return self.call("POST", "/api/reload", {})


# --------------------------------------------------------------------------- tables


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _num(value: object, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value * scale:{spec}}{suffix}"


def format_status(data: dict[str, Any]) -> str:
    rows = [["ROUTE", "RING", "POOL", "WEIGHT", "PHASE", "STEP", "REQ/S", "ERR", "P95",
             "VERDICT"]]
    for route in data.get("routes", []):
        for ring in route["rings"]:
            traffic = ring.get("traffic") or {}
            steps = ring.get("steps") or []
            step = ring.get("step")
            verdict = ring.get("verdict") or {}
            name = ring["name"] + (" (baseline)" if ring.get("baseline") else "")
            rows.append([
                route["name"], name, ring["pool"], _num(ring.get("weight"), "g", suffix="%"),
                ring.get("phase") or "-",
                f"{step + 1}/{len(steps)}" if steps and isinstance(step, int) else "-",
                _num(traffic.get("rps"), ".1f"), _num(traffic.get("error_rate"), ".2f", 100, "%"),
                _num(traffic.get("p95"), ".1f", 1000, "ms"),
                verdict.get("outcome", "-"),
            ])
    return f"revision {data.get('revision', '?')}\n" + _table(rows)


def format_events(data: dict[str, Any]) -> str:
    rows = [["TIME", "ROUTE", "RING", "KIND", "WEIGHT", "PHASE", "ACTOR", "REASON"]]
    for e in data.get("events", []):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(e["time"])))
        weight = f"{_num(e.get('from_weight'), 'g', suffix='%')} -> " \
                 f"{_num(e.get('to_weight'), 'g', suffix='%')}"
        rows.append([when, e["route"], e["ring"], e["kind"], weight, e["phase"],
                     str(e.get("actor", "")), str(e.get("reason", ""))])
    if len(rows) == 1:
        return "no events"
    return _table(rows)


def format_action(data: dict[str, Any]) -> str:
    ring = data["ring"]
    lines = [f"{e['route']}/{e['ring']}: {e['kind']} "
             f"{_num(e.get('from_weight'), 'g', suffix='%')} -> "
             f"{_num(e.get('to_weight'), 'g', suffix='%')} ({e['phase']})"
             for e in data.get("events", [])]
    lines.append(f"{ring['name']} is now {ring['phase']} at "
                 f"{_num(ring.get('weight'), 'g', suffix='%')}")
    return "\n".join(lines)
