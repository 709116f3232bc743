"""The CLI's side of the admin API: the SDK (``proxy.client.Client``) makes the calls;
this module turns the answers into the CLI's tables and lines.

The formatters read answers defensively (a field of the wrong type shows as "-" or its
text, never a traceback).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from proxy.client import DEFAULT_URL, Answer, open_url
from proxy.errors import AdminClientError
from proxy.processlog import escape

__all__ = ["DEFAULT_URL", "format_action", "format_events", "format_pools",
           "format_resource", "format_rings", "format_status", "format_written", "post_json"]


def post_json(url: str, timeout: float = 5.0) -> Answer:
    """POST an empty JSON body to ``url`` (the demo's upstream controls) and read the answer."""
    request = urllib.request.Request(url, data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        answer = json.loads(open_url(request, timeout) or b"null")
    except urllib.error.HTTPError as exc:
        raise AdminClientError(f"{url}: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise AdminClientError(f"cannot reach {url}: {exc.reason}") from None
    except (TimeoutError, ValueError) as exc:
        raise AdminClientError(f"bad answer from {url}: {exc}") from None
    if not isinstance(answer, dict):
        raise AdminClientError(f"bad answer from {url}: expected a JSON object")
    return answer


# --------------------------------------------------------------------------- reading answers


def _objects(value: object) -> list[Answer]:
    """The JSON objects of a list (none for anything else)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _object(value: object) -> Answer:
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- tables


def _table(rows: list[list[str]]) -> str:
    # (What callers sent, a reason, reaches the terminal: control characters escaped.)
    rows = [[escape(cell) for cell in row] for row in rows]
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


def servers_text(health: Answer) -> str:
    """The pool's servers in rotation: ``2/2 up``, or ``1/2 up, out: URL 25s (one host)``
    naming each server out and how long its ejection has left (when it is ejected)."""
    servers = _objects(health.get("servers"))
    if not servers:
        return "-"
    text = f"{health.get('available', '?')}/{len(servers)} up"
    out = []
    for server in servers:
        if server.get("up") is False:
            left = server.get("ejected_for")
            out.append(f"{server.get('url')}" + (f" {left:g}s" if isinstance(left, int | float)
                                                  else f" {server.get('state')}"))
    if out:
        text += ", out: " + " ".join(out)
        if health.get("one_host"):
            text += " (one host)"
    return text


def format_status(data: Answer) -> str:
    rows = [["ROUTE", "RING", "POOL", "SERVERS", "WEIGHT", "PHASE", "STEP", "REQ/S", "ERR",
             "P95", "VERDICT", "EVIDENCE"]]
    for route in _objects(data.get("routes")):
        for ring in _objects(route.get("rings")):
            traffic = _object(ring.get("traffic"))
            steps = ring.get("steps")
            step = ring.get("step")
            verdict = _object(ring.get("verdict"))
            name = f"{ring.get('name')}" + (" (baseline)" if ring.get("baseline") else "")
            rows.append([
                str(route.get("name")), name, str(ring.get("pool")),
                servers_text(_object(ring.get("health"))),
                _num(ring.get("weight"), "g", suffix="%"),
                str(ring.get("phase") or "-"),
                f"{step + 1}/{len(steps)}" if isinstance(steps, list) and steps
                and isinstance(step, int) else "-",
                _num(traffic.get("rps"), ".1f"), _num(traffic.get("error_rate"), ".2f", 100, "%"),
                _num(traffic.get("p95"), ".1f", 1000, "ms"),
                verdict_text(ring), lead_check(verdict),
            ])
    fleet = data.get("fleet")
    head = f"revision {data.get('revision', '?')}\n"
    if isinstance(fleet, dict):
        head += fleet_text(fleet) + "\n"
    return head + _table(rows)


def fleet_text(fleet: Answer) -> str:
    """One line for ``/api/routes``' ``fleet`` (state.backend: redis): where the shared
    state is, this member's role, whether the backend answers."""
    role = ("leader (judges the fleet's evidence)" if fleet.get("leading")
            else f"follower of {fleet.get('leader') or 'nobody yet'}")
    up = ("backend up" if fleet.get("up")
          else "backend DOWN: serving the last agreed states, nothing advances")
    text = (f"fleet: {fleet.get('backend', '?')} {fleet.get('url', '?')} "
            f"prefix {fleet.get('prefix', '')!r}, member {fleet.get('member', '?')}, {role}, "
            f"state version {fleet.get('version', '?')}, {up}")
    pending = fleet.get("local_rollbacks_pending")
    if isinstance(pending, list) and pending:
        text += f"; local rollbacks not yet shared: {', '.join(map(str, pending))}"
    return text


def format_events(data: Answer) -> str:
    rows = [["TIME", "ROUTE", "RING", "KIND", "WEIGHT", "PHASE", "ACTOR", "REASON"]]
    for e in _objects(data.get("events")):
        stamp = e.get("time")
        when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))
                if isinstance(stamp, int | float) else "-")
        if e.get("kind") == "config_change":  # a change to the file (the Rings API)
            ring = f"pool {e.get('pool')}" if e.get("pool") else str(e.get("ring"))
            rows.append([when, str(e.get("route") or "-"), ring, f"config {e.get('action')}",
                         f"{e.get('from_revision')} -> {e.get('revision')}", "-",
                         str(e.get("actor", "")), str(e.get("reason", ""))])
            continue
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


# --------------------------------------------------------------------------- the Rings API


def format_rings(rings: list[Answer]) -> str:
    rows = [["ROUTE", "#", "RING", "POOL", "WEIGHT", "RULES", "PHASE", "ACTIVE"]]
    for ring in rings:
        spec, status = _object(ring.get("spec")), _object(ring.get("status"))
        rules = spec.get("rules")
        rows.append([
            str(ring.get("route")), str(ring.get("position")), str(ring.get("name")),
            str(spec.get("pool")),
            _num(status.get("weight"), "g", suffix="%") if status else "(not serving)",
            str(len(rules)) if isinstance(rules, list) else "-",
            str(status.get("phase") or "-") if status else "-",
            ("yes" if status.get("active") else "no") if status else "-",
        ])
    if len(rows) == 1:
        return "no rings"
    return _table(rows)


def format_pools(pools: list[Answer]) -> str:
    rows = [["POOL", "SERVERS", "RINGS"]]
    for pool in pools:
        spec, status = _object(pool.get("spec")), _object(pool.get("status"))
        servers = spec.get("servers")
        rings = status.get("rings") if status else None
        rows.append([str(pool.get("name")),
                     ", ".join(map(str, servers)) if isinstance(servers, list) else "-",
                     ", ".join(map(str, rings)) if isinstance(rings, list) and rings else "-"])
    if len(rows) == 1:
        return "no pools"
    return _table(rows)


def format_resource(kind: str, resource: Answer) -> str:
    """One ring or pool: where it stands, its spec as the file writes it, its status."""
    import yaml

    where = (f"{resource.get('route')}/{resource.get('name')} (position "
             f"{resource.get('position')})" if kind == "ring" else str(resource.get("name")))
    lines = [f"{kind} {where}, revision {resource.get('revision')}"]
    lines += yaml.safe_dump(resource.get("spec"), sort_keys=False).splitlines()
    status = resource.get("status")
    if isinstance(status, dict):
        lines.append("status: " + ", ".join(
            f"{k} {', '.join(map(str, v)) or '-'}" if isinstance(v, list) else f"{k} {v}"
            for k, v in status.items()))
    else:
        lines.append("status: in the file, not serving yet")
    return "\n".join(lines)


def format_written(what: str, data: Answer) -> str:
    """A write's answer: what it did and the revision serving now."""
    if not data.get("changed"):
        return f"{what}: unchanged (revision {data.get('revision')})"
    return f"{what}: revision {data.get('previous_revision')} -> {data.get('revision')}"
