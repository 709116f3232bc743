"""The CLI's side of the admin API: status, rollout actions, events, reload.

Plain ``urllib`` (one request per command, no event loop needed).  Every failure becomes
an ``AdminClientError`` with a one-line message; the CLI prints it and exits 1.  Calls to a
loopback address never go through ``http_proxy``; an answer without the fields the admin
API always sends (a URL that is some other server, such as the proxy's own port) is an
error, never an empty table.
"""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping

from proxy.errors import AdminClientError

DEFAULT_URL = "http://127.0.0.1:9901"

# A JSON object as the API answers it; the formatters below read it defensively (a field of
# the wrong type shows as "-" or its text, never a traceback).
Answer = dict[str, object]


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _open(request: urllib.request.Request, timeout: float) -> bytes:
    """The answer's body; loopback never goes through a proxy from the environment."""
    handlers: list[urllib.request.BaseHandler] = []
    if is_loopback(request.full_url):
        handlers.append(urllib.request.ProxyHandler({}))
    opener = urllib.request.build_opener(*handlers)
    with opener.open(request, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def post_json(url: str, timeout: float = 5.0) -> Answer:
    """POST an empty JSON body to ``url`` (the demo's upstream controls) and read the answer."""
    request = urllib.request.Request(url, data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        answer = json.loads(_open(request, timeout) or b"null")
    except urllib.error.HTTPError as exc:
        raise AdminClientError(f"{url}: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise AdminClientError(f"cannot reach {url}: {exc.reason}") from None
    except (TimeoutError, ValueError) as exc:
        raise AdminClientError(f"bad answer from {url}: {exc}") from None
    if not isinstance(answer, dict):
        raise AdminClientError(f"bad answer from {url}: expected a JSON object")
    return answer


class AdminClient:
    def __init__(self, url: str, token: str | None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: Mapping[str, object] | None = None,
             expect: str | None = None) -> Answer:
        """``expect``: a key the admin API's answer always has (else: not a ringproxy)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            answer = json.loads(_open(request, self.timeout) or b"null")
        except urllib.error.HTTPError as exc:
            message = _error_of(exc)
            if message is None:
                raise AdminClientError(
                    f"{self.url} is not a ringproxy admin API (HTTP {exc.code} {exc.reason} "
                    f"to {path.split('?')[0]}, without the API's JSON error); --admin takes "
                    "the admin listener's URL (admin.listen)") from None
            raise AdminClientError(f"{message} (HTTP {exc.code})") from None
        except urllib.error.URLError as exc:
            raise AdminClientError(f"cannot reach the admin API at {self.url}: "
                                   f"{exc.reason}") from None
        except (TimeoutError, ValueError) as exc:
            raise AdminClientError(f"{self.url} is not a ringproxy admin API (its answer to "
                                   f"{path} is not JSON: {exc})") from None
        if not isinstance(answer, dict) or (expect is not None and expect not in answer):
            shape = f"no {expect!r} in" if isinstance(answer, dict) else "not a JSON object:"
            raise AdminClientError(
                f"{self.url} is not a ringproxy admin API ({shape} its answer to {path}); "
                "--admin takes the admin listener's URL (admin.listen)")
        return answer

    def status(self) -> Answer:
        return self.call("GET", "/api/routes", expect="routes")

    def explain(self, route: str, headers: list[tuple[str, str]],
                cookies: list[tuple[str, str]], query: list[tuple[str, str]],
                ip: str | None, path: str, method: str) -> Answer:
        """The running proxy's decision for such a request, at its live weights."""
        params: list[tuple[str, str]] = [("route", route), ("path", path), ("method", method)]
        params += [("header", f"{k}:{v}") for k, v in headers]
        params += [("cookie", f"{k}:{v}") for k, v in cookies]
        params += [("query", f"{k}:{v}") for k, v in query]
        if ip is not None:
            params.append(("ip", ip))
        return self.call("GET", "/api/explain?" + urllib.parse.urlencode(params), expect="ring")

    def act(self, route: str, ring: str, action: str, body: Mapping[str, object]) -> Answer:
        quote = urllib.parse.quote
        return self.call(
            "POST", f"/api/routes/{quote(route, safe='')}/rings/{quote(ring, safe='')}/{action}",
            body, expect="ring")

    def events(self, route: str | None, since: float | None) -> Answer:
        if route is not None:
            # An unknown route is an error, as everywhere else (the API filters silently).
            self.call("GET", f"/api/routes/{urllib.parse.quote(route, safe='')}", expect="name")
        query = {k: v for k, v in (("route", route), ("since", since)) if v is not None}
        suffix = "?" + urllib.parse.urlencode(query) if query else ""
        return self.call("GET", "/api/events" + suffix, expect="events")

    def reload(self) -> Answer:
        return self.call("POST", "/api/reload", {}, expect="revision")


def _error_of(exc: urllib.error.HTTPError) -> str | None:
    """The API's ``{"error": ...}`` message; None when the answer has none (another server)."""
    try:
        answer = json.loads(exc.read())
    except ValueError:
        return None
    finally:
        exc.close()
    message = answer.get("error") if isinstance(answer, dict) else None
    return str(message) if message else None


# --------------------------------------------------------------------------- reading answers


def _objects(value: object) -> list[Answer]:
    """The JSON objects of a list (none for anything else)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _object(value: object) -> Answer:
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- tables


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _num(value: object, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value * scale:{spec}}{suffix}"


def _weights(event: Answer) -> str:
    return (f"{_num(event.get('from_weight'), 'g', suffix='%')} -> "
            f"{_num(event.get('to_weight'), 'g', suffix='%')}")


def _progress(check: Answer) -> float:
    value = check.get("progress")
    return float(value) if isinstance(value, int | float) else 0.0


def verdict_text(ring: Answer) -> str:
    """The verdict's outcome, and ``starved`` when the analysis has been blind too long."""
    outcome = _object(ring.get("verdict")).get("outcome")
    shown = [str(outcome)] if outcome else []
    if ring.get("starved") is True:
        shown.append("starved")
    return ", ".join(shown) or "-"


def lead_check(verdict: Answer) -> str:
    """The check furthest toward a rollback: ``p95 37%`` (a worse one first, then the one
    with the most progress; ``within`` when every check is within tolerance)."""
    checks = _objects(verdict.get("checks"))
    if not checks:
        return "-"
    worse = [c for c in checks if c.get("finding") == "worse"]
    if worse:
        return f"{worse[0].get('name')} worse"
    lead = max(checks, key=_progress)  # the first of equals: the judge's order
    if _progress(lead) == 0 and all(c.get("finding") == "within" for c in checks):
        return "all within"
    finding = "within" if lead.get("finding") == "within" else "to rollback"
    return f"{lead.get('name')} {_progress(lead) * 100:.0f}% {finding}"


def format_status(data: Answer) -> str:
    rows = [["ROUTE", "RING", "POOL", "WEIGHT", "PHASE", "STEP", "REQ/S", "ERR", "P95",
             "VERDICT", "EVIDENCE"]]
    for route in _objects(data.get("routes")):
        for ring in _objects(route.get("rings")):
            traffic = _object(ring.get("traffic"))
            steps = ring.get("steps")
            step = ring.get("step")
            verdict = _object(ring.get("verdict"))
            name = f"{ring.get('name')}" + (" (baseline)" if ring.get("baseline") else "")
            rows.append([
                str(route.get("name")), name, str(ring.get("pool")),
                _num(ring.get("weight"), "g", suffix="%"),
                str(ring.get("phase") or "-"),
                f"{step + 1}/{len(steps)}" if isinstance(steps, list) and steps
                and isinstance(step, int) else "-",
                _num(traffic.get("rps"), ".1f"), _num(traffic.get("error_rate"), ".2f", 100, "%"),
                _num(traffic.get("p95"), ".1f", 1000, "ms"),
                verdict_text(ring), lead_check(verdict),
            ])
    return f"revision {data.get('revision', '?')}\n" + _table(rows)


def format_events(data: Answer) -> str:
    rows = [["TIME", "ROUTE", "RING", "KIND", "WEIGHT", "PHASE", "ACTOR", "REASON"]]
    for e in _objects(data.get("events")):
        stamp = e.get("time")
        when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
                if isinstance(stamp, int | float) else "-")
        rows.append([when, str(e.get("route")), str(e.get("ring")), str(e.get("kind")),
                     _weights(e), str(e.get("phase")),
                     str(e.get("actor", "")), str(e.get("reason", ""))])
    if len(rows) == 1:
        return "no events"
    return _table(rows)


def format_action(data: Answer) -> str:
    ring = _object(data.get("ring"))
    lines = [f"{e.get('route')}/{e.get('ring')}: {e.get('kind')} {_weights(e)} "
             f"({e.get('phase')})"
             for e in _objects(data.get("events"))]
    lines.append(f"{ring.get('name')} is now {ring.get('phase')} at "
                 f"{_num(ring.get('weight'), 'g', suffix='%')}")
    return "\n".join(lines)
