"""The JSON Schema of the config file, for editors (completion, hover, squiggles) and CI.

Built from the model: the keys are those the readers accept (a test compares them, section
by section, with the reader's own "known keys"), the defaults are read off the model's
classes, and the enumerations (balance, rule operators, quantiles, roles) are the model's.
``ringproxy schema`` prints it.  The schema checks shape; ``ringproxy check`` stays the
judge of everything else (cross references, weights adding up, secrets from the
environment).  Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from proxy.config.admin import ROLES
from proxy.config.analysis import QUANTILES, Analysis, Criteria, FastRollback
from proxy.config.assignment import AnonymousCookie
from proxy.config.checks import ExternalCheck, Hook, OnFail, PrometheusQuery, RingHealthCheck
from proxy.config.health import (
    RETRY_FAILURES,
    RETRY_METHODS,
    RETRY_STATUSES,
    HealthCheck,
    Outlier,
    PoolDown,
    Retries,
)
from proxy.config.limits import (
    CONNECTIONS_RANGE,
    HEAD_SIZE_RANGE,
    HEADERS_RANGE,
    MAX_BODY_RANGE,
    REQUEST_BUFFER_RANGE,
    REQUEST_LINE_RANGE,
    Limits,
)
from proxy.config.model import (
    REQUEST_ID_LENGTH,
    AccessLog,
    Balance,
    Config,
    LogFormat,
    Metrics,
    Policy,
    Pool,
    Ring,
)
from proxy.config.ringlimits import MAX_BURST, MAX_RATE
from proxy.config.rollout import Progression, RedisState, StateFiles, Webhook
from proxy.config.rules import Op

Schema = dict[str, Any]

SCHEMA_ID = "https://ringproxy.invalid/schema/config.json"
# Each unit at most once, largest first: 1h30m, 1m30s, 250ms (as parse_duration reads them).
_DURATION_PATTERN = "^" + "".join(rf"(\d+(\.\d+)?{u})?" for u in ("d", "h", "m", "s", "ms")) + "$"
_ENV = r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}"


def _duration(seconds: float | None, text: str) -> Schema:
    out: Schema = {"type": "string", "pattern": _DURATION_PATTERN, "minLength": 2,
                   "description": f"{text} (a duration: 250ms, 30s, 5m, 1m30s, 1h, 7d)"}
    if seconds is not None:
        out["default"] = _seconds_text(seconds)
    return out


def _seconds_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"


def _obj(properties: Schema, required: tuple[str, ...] = (), text: str = "") -> Schema:
    out: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = list(required)
    if text:
        out["description"] = text
    return out


def _str(text: str, default: str | None = None, **more: Any) -> Schema:
    out: Schema = {"type": "string", "description": text, **more}
    if default is not None:
        out["default"] = default
    return out


def _bool(text: str, default: bool) -> Schema:
    return {"type": "boolean", "description": text, "default": default}


def _bool_or_auto(text: str) -> Schema:
    return {"type": ["boolean", "null"], "description": text}


def _int(text: str, lo: int, hi: int, default: int | None = None) -> Schema:
    out: Schema = {"type": "integer", "minimum": lo, "maximum": hi, "description": text}
    if default is not None:
        out["default"] = default
    return out


_SIZE_PATTERN = r"^\d+ ?(B|KiB|MiB|GiB)$"


def _size(text: str, bounds: tuple[int, int], default: int | None = None) -> Schema:
    """Bytes as an integer, or a whole number with a binary unit (64KiB, 10 MiB)."""
    lo, hi = bounds
    out: Schema = {"anyOf": [{"type": "integer", "minimum": lo, "maximum": hi},
                             {"type": "string", "pattern": _SIZE_PATTERN}],
                   "description": f"{text} (bytes, or 512B, 64KiB, 10MiB, 1GiB)"}
    if default is not None:
        out["default"] = default
    return out


def _limits() -> Schema:
    d = Limits()
    return _obj({
        "head_timeout": _duration(d.head_timeout, "time to receive a request head (408)"),
        "body_timeout": _duration(d.body_timeout, "longest silence in a request body (408)"),
        "keepalive_timeout": _duration(d.keepalive_timeout, "idle keep-alive connection"),
        "max_request_line": _size("request line (414)", REQUEST_LINE_RANGE,
                                  d.max_request_line),
        "max_head_size": _size("request head (431); upstream response head (502)",
                               HEAD_SIZE_RANGE, d.max_head_size),
        "max_headers": _int("header fields (431)", *HEADERS_RANGE, d.max_headers),
        "max_connections": _int("client connections per process (default: from "
                                "RLIMIT_NOFILE)", *CONNECTIONS_RANGE),
        "request_buffer": _size("bodies up to this are read whole before an upstream "
                                "connection is taken; 0 always streams",
                                REQUEST_BUFFER_RANGE, d.request_buffer),
        "underscores_in_headers": _bool("forward header names containing _",
                                        d.underscores_in_headers),
        "tunnel_idle_timeout": _duration(d.tunnel_idle_timeout, "a WebSocket/upgraded "
                                         "tunnel silent both ways this long is closed"),
    }, text="what the proxy accepts from clients (README: Client limits and TLS)")


def _percent(text: str, default: float | None = None) -> Schema:
    out: Schema = {"type": "number", "minimum": 0, "maximum": 100, "description": text}
    if default is not None:
        out["default"] = default
    return out


_ADDRESS = _str("HOST:PORT ([::1]:8080 for IPv6; port 0 picks a free one)",
                pattern=r"^(\[[0-9A-Fa-f:.]+\]|[^:\s\[\]]+):\d{1,5}$|" + _ENV)
_NAME = _str("letters, digits, _ . - (used in headers and metrics)",
             pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_OFF: Schema = {"enum": ["off", False, None]}


def _policy() -> Schema:
    base = Policy()
    return _obj({
        "timeout": _duration(base.timeout, "request sent -> response headers (else 504)"),
        "idle_timeout": _duration(base.idle_timeout, "the longest silence while streaming"),
        "max_concurrency": _int("in-flight requests on the ring; more get 503",
                                1, 10_000_000),
        "add_headers": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": "headers sent upstream; values may use {ring} and "
                        "{route}"},
        "rate_limit": _rate_limit(),
        "max_body": _size("largest request body on the ring (413); the route's max_body "
                          "holds too", MAX_BODY_RANGE),
    }, text="a ring's request policy (a route's is the default of its rings)")


def _rate_limit() -> Schema:
    return _obj({
        "requests_per_second": {"type": "number", "exclusiveMinimum": 0,
                                "maximum": MAX_RATE, "description": "tokens added a second"},
        "burst": _int("requests that may come at once (default: the rate rounded up)", 1,
                      MAX_BURST),
    }, required=("requests_per_second",),
        text="a token bucket per ring per process; over it the proxy answers 429 with "
        "Retry-After (its own refusal, never the version's error)")


def _credential() -> Schema:
    return _obj({
        "header": _str("the header the proxy sets on every request to the pool (a "
                       "client's of the same name is removed)"),
        "value": _str("from the environment: ${VAR}, e.g. 'Bearer ${API_TOKEN}' (never the "
                      "secret itself; no :-default)", pattern=".*" + _ENV + ".*"),
        "shared": _bool("other pools may use the same variable (never a non-production "
                        "pool a production one's)", False),
    }, required=("header", "value"))


def _upstream_tls() -> Schema:
    return _obj({
        "ca": _str("PEM CA bundle the servers are verified with (default: the system's)"),
        "cert": _str("client certificate PEM path (mTLS), with key"),
        "key": _str("the client certificate's unencrypted PEM key path"),
        "server_name": _str("TLS name sent (SNI) and verified, instead of each server's host"),
        "verify": _bool("verify the servers' certificates and names", True),
    }, text="TLS to the pool's https:// servers")


def _rule() -> Schema:
    value: Schema = {"anyOf": [{"type": ["string", "number", "boolean"]},
                               {"type": "array", "items": {"type": ["string", "number"]}}]}
    ops = {op.value: value for op in Op}
    ops["exists"] = {"type": "boolean"}
    rule = _obj({"attr": _str("header:NAME, cookie:NAME, query:NAME, ip, path or method",
                              pattern=r"^(header|cookie|query):.+$|^(ip|path|method)$"),
                 "ignore_case": {"type": "boolean", "default": False}, **ops},
                required=("attr",), text="one attribute rule: attr and exactly one operator")
    rule["minProperties"] = 2
    rule["maxProperties"] = 3
    group = _obj({"all": {"type": "array", "items": rule, "minItems": 1}}, required=("all",),
                 text="all rules of the group must hold")
    return {"type": "array", "items": {"anyOf": [rule, group]},
            "description": "the ring matches when any item (a rule or an `all:` group) holds"}


def _progression() -> Schema:
    step: Schema = {"anyOf": [
        _percent("the weight of this step"),
        _obj({"weight": _percent("the weight of this step"),
              "approval": {"enum": ["none", "required"], "default": "none"},
              **_step_criteria()},
             required=("weight",)),
    ]}
    return _obj({
        "steps": {"type": "array", "items": step, "minItems": 1,
                  "description": "increasing weights; the first is the starting weight"},
        "min_step_duration": _duration(Progression(()).min_step_duration,
                                       "the least time at a step before an advance"),
    }, required=("steps",), text="the weights a ring advances along while it is healthy")


def _ring() -> Schema:
    base = Ring(name="", pool="")
    return _obj({
        "name": _NAME, "pool": _str("the pool this ring's requests go to"),
        "rules": _rule(), "policy": _policy(),
        "weight": _percent("share of sticky buckets in percent (0.01 steps)"),
        "progression": _progression(),
        "pinned": _bool("keeps its pool when a rollback takes that pool's other rings off",
                        base.pinned),
        "on_pool_down": {"enum": [p.value for p in PoolDown], "default": base.on_pool_down.value,
                         "description": "no healthy server in the ring's pool: refuse (503 "
                         "with Retry-After) or send to the next later ring with one"},
        "health_checks": _ring_health_checks(),
    }, required=("name", "pool"), text="an audience segment, sent to one pool")


def _sticky() -> Schema:
    cookie = AnonymousCookie()
    anonymous = _obj({
        "cookie": _str("the cookie's name", cookie.name),
        "max_age": _duration(float(cookie.max_age), "the cookie's lifetime"),
        "secure": {"enum": ["auto", "always", "never"], "default": cookie.secure},
        "http_only": _bool("HttpOnly", cookie.http_only),
        "same_site": {"enum": ["Lax", "Strict", "None"], "default": cookie.same_site},
        "domain": _str("the cookie's Domain"),
        "path": _str("the cookie's Path", cookie.path),
    })
    source = _str("header:NAME, cookie:NAME or query:NAME",
                  pattern=r"^(header|cookie|query):.+$")
    return _obj({
        "key": {"anyOf": [source, {"type": "array", "items": source, "minItems": 1}],
                "description": "the user's key sources, the first present wins"},
        "salt": _str("routes with different salts pick independent users (default: the "
                     "route's name)"),
        "anonymous": {"anyOf": [{"type": "boolean"}, anonymous],
                      "description": "give a request without a key an id in a cookie"},
    }, required=("key",))


def _analysis() -> Schema:
    analysis, criteria, fast = Analysis(), Criteria(), FastRollback(0.5)
    increase = criteria.max_error_rate_increase
    latency = _obj({q: {"anyOf": [{"type": "number", "minimum": 1}, _OFF]}
                    for q in QUANTILES},
                   text="per quantile, at most RATIO x the baseline's")
    props: Schema = {
        "interval": _duration(analysis.interval, "how often the judge looks"),
        "baseline": _str("the ring others are compared with (default: the last)"),
        "alpha": {"type": "number", "exclusiveMinimum": 0, "maximum": 0.5,
                  "default": criteria.alpha,
                  "description": "at most this chance of rolling back a healthy ring"},
        "max_error_rate_increase": {"anyOf": [_percent("percentage points above the "
                                                       "baseline's error rate"), _OFF],
                                    "default": None if increase is None else increase * 100},
        "latency": {"anyOf": [latency, _OFF]},
        "latency_floor": _duration(criteria.latency_floor,
                                   "a latency limit is never closer than this to the "
                                   "baseline's"),
        "error_statuses": {"anyOf": [
            {"type": "array", "items": {"type": ["integer", "string"]}},
            {"type": ["integer", "string"]}],
            "description": "answers that count as errors, e.g. [5xx, 429]"},
        "max_error_rate": {"anyOf": [_percent("an absolute error rate limit"), _OFF]},
        **{f"max_{q}": _duration(None, f"an absolute {q} limit") for q in QUANTILES},
        "min_requests": _int("a step never advances on fewer of the ring's requests",
                             1, 100_000_000, criteria.min_requests),
        "max_blind": _duration(analysis.max_blind, "undecided that long: analysis_starved"),
        "fast_rollback": _obj({
            "max_error_rate": _percent("the hard limit over the last window"),
            "min_requests": _int("at least this many requests in the window", 1,
                                 100_000_000, fast.min_requests),
            "window": _duration(fast.window, "the recent history looked at"),
        }, required=("max_error_rate",)),
        **_external_checks(),
    }
    return _obj(props, text="automatic rollback and progression (README: Automatic "
                "rollback)")


def _step_criteria() -> Schema:
    """A progression step's own duration, limits and checks (proxy.config.rollout.Step)."""
    return {
        "min_duration": _duration(None, "the least time at this step (replaces "
                                  "min_step_duration; survives restarts)"),
        "max_error_rate": _percent("an absolute error rate limit at this step"),
        **{f"max_{q}": _duration(None, f"an absolute {q} limit at this step")
           for q in QUANTILES},
        "checks": {"type": "array", "items": {"type": "string"},
                   "description": "analysis.checks that apply at this step only"},
    }


def _hook(text: str) -> Schema:
    hook = Hook("")
    return {"anyOf": [_str("the URL"), _obj({
        "url": _str("http(s) URL, POSTed JSON; 2xx passes"),
        "timeout": _duration(hook.timeout, "the whole call"),
        "headers": {"type": "object", "additionalProperties": {"type": "string"},
                    "description": "secrets from the environment: ${VAR}"},
        "interval": _duration(hook.interval, "pre_advance: between tries while it fails"),
    }, required=("url",))], "description": text}


def _on_fail() -> Schema:
    return {"enum": [o.value for o in OnFail], "default": OnFail.ROLLBACK.value,
            "description": "a failing check rolls the ring back or holds it"}


def _external_checks() -> Schema:
    check = ExternalCheck("")
    item = _obj({
        "name": _NAME,
        "prometheus": _obj({
            "url": _str("the Prometheus server, e.g. http://prometheus:9090"),
            "query": _str("PromQL returning one number; {ring}, {route}, {pool} filled in"),
            "timeout": _duration(PrometheusQuery("", "").timeout, "the query's timeout"),
        }, required=("url", "query")),
        "webhook": _hook("POSTed the ring's state; 2xx passes"),
        "max": {"type": "number", "description": "the value must be at most this"},
        "min": {"type": "number", "description": "the value must be at least this"},
        "on_fail": _on_fail(),
        "interval": _duration(check.interval, "how often it runs"),
        "threshold": _int("failing results in a row that fail it", 1, 1000, check.threshold),
    }, required=("name",), text="a Prometheus query with a bound, or a webhook")
    return {
        "checks": {"type": "array", "items": item,
                   "description": "checks from outside the proxy (README: Progression "
                   "criteria and external checks)"},
        "pre_advance": _hook("must answer 2xx before each step advance"),
        "post_rollback": _hook("told of every rollback"),
    }


def _ring_health_checks() -> Schema:
    base = RingHealthCheck("", "/")
    return {"type": "array", "items": _obj({
        "name": _NAME,
        "path": _str("GET to every server of the ring's pool, e.g. /health/db", pattern="^/"),
        "interval": _duration(base.interval, "how often"),
        "timeout": _duration(base.timeout, "each request"),
        "threshold": _int("failures in a row that fail the ring's verdict", 1, 1000,
                          base.threshold),
        "on_fail": _on_fail(),
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
    }, required=("name", "path")), "description": "custom checks of the ring's version"}


def _route() -> Schema:
    host = _str("exact (api.example.com) or wildcard (*.example.com)")
    return _obj({
        "name": _NAME,
        "match": _obj({
            "host": {"anyOf": [host, {"type": "array", "items": host}]},
            "path_prefix": _str("matches at a segment boundary", "/", pattern="^/"),
        }),
        "policy": _policy(),
        "sticky": _sticky(),
        "override": _obj({
            "header": _str("a header naming a ring"),
            "cookie": _str("a cookie naming a ring"),
            "secret_header": _str("the header carrying the secret"),
            "secret": _str("from the environment only: ${VAR}", pattern=_ENV),
            "cidrs": {"type": "array", "items": {"type": "string"}},
            "allow_rolled_back": _bool("an override may reach a rolled-back ring", False),
        }, text="QA: pick a ring by header or cookie, with proof"),
        "decision": _obj({
            "reason_upstream": _bool("send X-Ring-Reason upstream", False),
            "response": _bool("return X-Ring and X-Ring-Reason to the client", False),
        }),
        "analysis": {"anyOf": [_analysis(), {"type": "null"}]},
        "rollback": _obj({"to": {"enum": ["zero", "previous_step"], "default": "zero"}}),
        "max_body": _size("largest request body (413)", MAX_BODY_RANGE),
        "rings": {"type": "array", "items": _ring(), "minItems": 1,
                  "description": "in order; the last ring is the default"},
    }, required=("name", "rings"), text="matches requests and owns an ordered list of rings")


def _pool() -> Schema:
    base = Pool(name="", servers=())
    server = _str("http://HOST:PORT or https://HOST:PORT (no path)",
                  pattern=r"^(https?://[^/\s]+/?|.*" + _ENV + r".*)$")
    return _obj({
        "servers": {"type": "array", "items": server, "minItems": 1},
        "balance": {"enum": [b.value for b in Balance], "default": base.balance.value},
        "connect_timeout": _duration(base.connect_timeout, "a longer connect is a 504"),
        "max_connections": _int("open connections to the pool", 1, 1_000_000,
                                base.max_connections),
        "keepalive_timeout": _duration(base.keepalive_timeout, "idle pooled connections "
                                       "close after this"),
        "preserve_host": _bool("send the client's Host header", base.preserve_host),
        "health": {"anyOf": [_health(), _OFF]},
        "outlier": {"anyOf": [_outlier(), _OFF]},
        "retries": {"anyOf": [_retries(), _OFF]},
        "auth": {"anyOf": [_credential(), {"type": "array", "items": _credential(),
                                           "minItems": 1}],
                 "description": "credentials set on every request to the pool"},
        "tls": _upstream_tls(),
        "environment": _str("a free word; production's credentials never reach another "
                            "pool", pattern=r"^[A-Za-z0-9_.-]+$"),
    }, required=("servers",))


def _health() -> Schema:
    d = HealthCheck(path="/")
    status: Schema = {"anyOf": [{"type": "integer", "minimum": 100, "maximum": 599},
                                {"type": "string", "pattern": r"^(\d{3}(-\d{3})?|[1-5]xx)$"}],
                      "default": f"{d.expect_status[0]}-{d.expect_status[1]}",
                      "description": "the statuses that pass: 200, 200-399 or 2xx"}
    return _obj({
        "path": _str("the path each server is asked (GET)", pattern="^/"),
        "interval": _duration(d.interval, "time between checks of one server (jittered, "
                              "never shorter)"),
        "timeout": _duration(d.timeout, "a check without a response head by then fails"),
        "healthy_threshold": _int("successes in a row that bring a server back", 1, 100,
                                  d.healthy_threshold),
        "unhealthy_threshold": _int("failures in a row that take a server out", 1, 100,
                                    d.unhealthy_threshold),
        "expect_status": status,
        "headers": {"type": "object", "additionalProperties": {"type": "string"},
                    "description": "headers each check sends"},
    }, required=("path",), text="active health checks (README: Upstream health)")


def _outlier() -> Schema:
    d = Outlier()
    return _obj({
        "consecutive_failures": _int("failures in a row that eject a server", 1, 1000,
                                     d.consecutive_failures),
        "base_ejection": _duration(d.base_ejection, "the first ejection's length (times the "
                                   "number of ejections in a row)"),
        "max_ejection": _duration(d.max_ejection, "the longest ejection"),
        "max_ejection_percent": _int("at most this share of the pool's servers ejected at "
                                     "once (rounded down)", 0, 100, d.max_ejection_percent),
        "on_5xx": _bool("5xx answers count as failures", d.on_5xx),
    }, text="passive outlier ejection from real traffic (on by default; off to disable)")


def _retries() -> Schema:
    d = Retries()
    on: Schema = {"type": "array", "items": {"enum": [*RETRY_FAILURES, *RETRY_STATUSES,
                                                      *map(str, RETRY_STATUSES)]},
                  "default": sorted(d.on)}
    return _obj({
        "attempts": _int("retries after the first attempt", 1, 10, d.attempts),
        "on": on,
        "methods": {"type": "array", "items": {"enum": list(RETRY_METHODS)},
                    "default": sorted(d.methods)},
        "budget": {"anyOf": [_percent("share of the pool's requests that may be retried"),
                             {"type": "string", "pattern": r"^\d+(\.\d+)?%$"}],
                   "default": f"{d.budget * 100:g}%"},
        "min_retries": _int("retries allowed in any 10 s whatever the budget", 0, 1_000_000,
                            d.min_retries),
    }, text="retries on another server of the same pool (off unless set)")


def config_schema() -> Schema:
    """The whole file's schema (JSON Schema draft 2020-12)."""
    config, state, hook = Config(), StateFiles(), Webhook("")
    token = _obj({
        "env": _str("the environment variable holding the token (never the token)",
                    pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"),
        "role": {"enum": list(ROLES)},
        "routes": {"type": "array", "items": {"type": "string"}},
        "rings": {"type": "array", "items": {"type": "string"}},
    }, required=("env", "role"))
    webhook = _obj({"url": _str("an http(s) URL"),
                    "timeout": _duration(hook.timeout, "per attempt"),
                    "retries": _int("attempts after the first", 0, 20, hook.retries)},
                   required=("url",))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "ringproxy config",
        **_obj({
            "listen": {**_ADDRESS, "default": str(config.listen)},
            "admin": _obj({"listen": {**_ADDRESS, "default": str(config.admin.listen)},
                           "tokens": {"type": "array", "items": token},
                           "hosts": {"type": "array", "items": _str(
                               "a Host name the admin API answers besides loopback names "
                               "(checked only without tokens: DNS rebinding)")},
                           "config_writes": _bool_or_auto(
                               "may the Rings API write this file (default: when it is "
                               "writable; false: change it in Git)")}),
            "access_log": _obj({"enabled": _bool("one JSON line per request",
                                                 AccessLog().enabled),
                                "path": _str('"-" is standard output', AccessLog().path)}),
            "shutdown_grace": _duration(config.shutdown_grace,
                                        "how long in-flight requests may finish"),
            "drain_delay": _duration(config.drain_delay, "after SIGTERM, /readyz answers "
                                     "503 this long while the listener still serves"),
            "workers": {"anyOf": [_int("processes serving clients (1: this one; N: a "
                                       "supervisor and N workers sharing the port)", 1, 256,
                                       config.workers),
                                  {"const": "auto", "description": "one per CPU"}]},
            "trusted_proxies": {"type": "array", "items": _str(
                "a network (CIDR) of load balancers whose X-Forwarded-For/Forwarded name "
                "the client")},
            "trusted_hops": _int("0: the right-most untrusted X-Forwarded-For entry is "
                                 "the client; N: the N-th entry from the right", 0, 64,
                                 config.trusted_proxies.hops),
            "metrics": _obj({"enabled": _bool("per-ring metrics (the analysis needs them)",
                                              Metrics().enabled)}),
            "state": _obj({"path": _str("rollout state file", state.path),
                           "audit": _str("audit trail (JSON lines)", state.audit),
                           "backend": {"enum": ["file", "redis"], "default": "file",
                                       "description": "redis: one rollout shared by every "
                                       "process with the same url and prefix"},
                           "url": _str("the Redis URL, from the environment only: ${VAR}",
                                       pattern=_ENV),
                           "prefix": _str("every Redis key of the fleet starts with it",
                                          RedisState().prefix),
                           "lease": _duration(RedisState().lease,
                                              "a leader's lease in Redis")}),
            "webhooks": {"type": "array", "items": {"anyOf": [_str("an http(s) URL"),
                                                               webhook]}},
            "limits": _limits(),
            "log_format": {"enum": [f.value for f in LogFormat], "default": config.log_format.value,
                           "description": "the process log's format (stderr): text lines "
                           "or one JSON object per line; the access log is always JSON"},
            "request_id": _obj({
                "trust_incoming": _bool("keep a client's X-Request-Id when it is 1..max_length "
                                        "of A-Za-z0-9._:- (else one is generated)",
                                        config.request_id.trust_incoming),
                "max_length": _int("the longest client X-Request-Id kept", *REQUEST_ID_LENGTH,
                                   config.request_id.max_length),
            }, text="X-Request-Id: which incoming ids are kept"),
            "listen_tls": _obj({
                "listen": _ADDRESS,
                "cert": _str("PEM certificate chain file (reloaded when it changes)"),
                "key": _str("PEM private key file, unencrypted"),
            }, required=("listen", "cert", "key"), text="an HTTPS listener"),
            "pools": {"type": "object", "additionalProperties": _pool(),
                      "propertyNames": {"pattern": _NAME["pattern"]}, "minProperties": 1},
            "routes": {"type": "array", "items": _route(), "minItems": 1},
        }, required=("pools", "routes")),
        # extension fields, ignored: a place for anchors (x-defaults: &defaults {...})
        "patternProperties": {"^x-": {}},
    }
