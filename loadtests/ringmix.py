"""Pure helpers for ``loadtests/locustfile.py``: who the simulated visitors are, what they
send, and the ring report computed from what they saw.

No locust, no gevent, no I/O here (``load_expectation`` reads the config file and nothing
else), so all of it is unit-tested directly (``tests/test_locust_smoke.py``).

The report answers three questions about a run against a proxy whose weights did not change:

* **Stickiness.** Every visitor identity (a user id from the pool, or the anonymous id the
  proxy handed out in its cookie) must be answered by one ring only.  The number of
  identities seen in two or more rings must be 0.
* **Correctness.** Each identity's ring must be the one the config predicts for the
  request it sends (``proxy.assign.assign`` on the same headers and cookies).
* **Shares.** Over the requests assigned by sticky bucket (not by a rule such as
  ``X-Beta: true``), each ring's share must be within a tolerance of its configured weight;
  the default ring's expected share is what the weights leave.  Requests are clustered by
  identity (one user's requests all land in one ring), so the tolerance is ``z`` standard
  errors of a proportion over the *effective* number of identities, Kish's
  ``(sum w)^2 / sum w^2`` with ``w`` = requests per identity, never below ``floor``.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.config import Config, Route, load_config
from proxy.routing.assign import (
    BUCKETS,
    CompiledRoute,
    Reason,
    StaticRequest,
    assign,
    compile_route,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config" / "demo.yaml"
NO_RING = "(none)"  # the row for responses without an X-Ring header (connection errors)

# ----------------------------------------------------------------------------- visitors


def user_id(index: int, pool: int) -> str:
    """The stable id of user ``index`` of a pool: ``user-0000`` … (at least 4 digits)."""
    width = max(4, len(str(max(pool - 1, 0))))
    return f"user-{index:0{width}d}"


def is_beta(uid: str, share: float) -> bool:
    """Whether ``uid`` is a beta tester: a fixed property of the id, about ``share`` of ids.

    Independent of the proxy's bucket hash (CRC-32 here, murmur3 there), so beta testers are
    not concentrated in any ring's bucket range.
    """
    return zlib.crc32(f"beta:{uid}".encode()) / 2**32 < share


@dataclass(frozen=True, slots=True)
class Persona:
    """Who one visit is.  ``uid`` None: an anonymous visitor (no id until the proxy sets one)."""

    uid: str | None
    channel: str  # "header" (X-User-Id), "cookie" (uid), "both", or "anonymous"
    beta: bool = False

    def headers(self, user_header: str | None, beta_header: tuple[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.uid is not None and user_header and self.channel in ("header", "both"):
            out[user_header] = self.uid
        if self.beta:
            out[beta_header[0]] = beta_header[1]
        return out

    def cookies(self, user_cookie: str | None) -> dict[str, str]:
        if self.uid is not None and user_cookie and self.channel in ("cookie", "both"):
            return {user_cookie: self.uid}
        return {}


CHANNELS = {"header": 45, "cookie": 35, "both": 20}


def pick_persona(
    rng: random.Random,
    pool: int,
    anonymous_share: float,
    beta_share: float,
    channels: Sequence[str] = ("header", "cookie", "both"),
) -> Persona:
    """A visitor: anonymous with ``anonymous_share``, else a user of the pool.

    Keyed users send their id as the ``X-User-Id`` header (an app: 45 %), the ``uid`` cookie
    (a browser: 35 %) or both (20 %), as far as the route has such key sources
    (``channels``); the proxy must treat them all the same.  With no channel, everyone is
    anonymous.
    """
    if not channels or rng.random() < anonymous_share:
        return Persona(None, "anonymous")
    uid = user_id(rng.randrange(pool), pool)
    channel = rng.choices(channels, weights=[CHANNELS[c] for c in channels])[0]
    return Persona(uid, channel, is_beta(uid, beta_share))


def parse_range(text: str, what: str = "range") -> tuple[float, float]:
    """``"3-30"`` -> (3.0, 30.0); ``"5"`` -> (5.0, 5.0)."""
    lo, sep, hi = text.strip().partition("-")
    try:
        a = float(lo)
        b = float(hi) if sep else a
    except ValueError:
        raise ValueError(f"{what}: expected MIN-MAX such as 3-30, got {text!r}") from None
    if a < 0 or b < a:
        raise ValueError(f"{what}: expected 0 <= MIN <= MAX, got {text!r}")
    return a, b


def parse_header(text: str) -> tuple[str, str]:
    """``"X-Beta: true"`` -> ("X-Beta", "true")."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


_WORDS = ("alpha", "bravo", "delta", "kilo", "lima", "oscar", "sierra", "tango", "zulu",
          "blue", "green", "large", "small", "express", "gift", "note", "promo", "size")


def json_body(rng: random.Random, size: int) -> bytes:
    """A JSON object of realistic shape (a client, line items), exactly ``size`` bytes when
    ``size`` is at least 200, padded with a ``pad`` string."""
    items: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"client": {"app": "web", "version": f"7.{rng.randrange(20)}.0"},
                           "items": items}
    length = len(_dumps(doc))
    while not items or length < size - 150:  # an item is at most ~100 bytes: room to pad
        item = {"sku": f"SKU-{rng.randrange(10**6):06d}", "qty": rng.randrange(1, 5),
                "note": " ".join(rng.choices(_WORDS, k=rng.randrange(1, 6)))}
        length += len(_dumps(item)) + (1 if items else 0)
        items.append(item)
    pad = size - length - len(',"pad":""')
    if pad >= 0:
        doc["pad"] = "x" * pad
    return _dumps(doc).encode()


def _dumps(doc: object) -> str:
    return json.dumps(doc, separators=(",", ":"))


# ----------------------------------------------------------------------------- expectation


@dataclass(frozen=True)
class Expectation:
    """What a config says about one route's rings."""

    config: Config
    route: Route
    compiled: CompiledRoute
    bucket_share: dict[str, float]  # ring -> expected share of bucket-assigned requests
    pools: dict[str, str]  # ring -> pool

    @property
    def user_header(self) -> str | None:
        """The first sticky-key header (as ``X-User-Id``), or None."""
        name = self._source("header")
        return "-".join(p.capitalize() for p in name.split("-")) if name else None

    @property
    def user_cookie(self) -> str | None:
        return self._source("cookie")

    @property
    def channels(self) -> tuple[str, ...]:
        """How a keyed user can send its id on this route."""
        if self.user_header and self.user_cookie:
            return ("header", "cookie", "both")
        return ("header",) if self.user_header else ("cookie",) if self.user_cookie else ()

    @property
    def anonymous_cookie(self) -> str | None:
        sticky = self.route.sticky
        return sticky.anonymous.name if sticky and sticky.anonymous else None

    def _source(self, attr: str) -> str | None:
        for s in self.route.sticky.key if self.route.sticky else ():
            if s.attr.value == attr:
                return s.name
        return None

    def weight_label(self, ring: str) -> str:
        spec = next(r for r in self.route.rings if r.name == ring)
        if spec is self.route.default_ring:
            return "rest"
        if spec.weight is not None:
            return f"{spec.weight / 100:g} %"
        return "rule" if spec.rules else "—"

    def predict(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> tuple[str, bool]:
        """The ring the config gives such a request, and whether by sticky bucket."""
        d = assign(self.compiled, StaticRequest.build(headers.items(), cookies=dict(cookies)))
        return d.ring, d.bucket is not None and d.reason in (Reason.BUCKET, Reason.DEFAULT)


def expectation_for(config: Config, route: str | None = None) -> Expectation:
    """The expectation for ``route`` (default: the first route with sticky buckets)."""
    if route is None:
        chosen = next((r for r in config.routes if r.sticky), config.routes[0])
    else:
        found = [r for r in config.routes if r.name == route]
        if not found:
            names = ", ".join(r.name for r in config.routes)
            raise ValueError(f"no route {route!r} in {config.source} (routes: {names})")
        chosen = found[0]
    compiled = compile_route(chosen, config.revision)
    share = {r.name: 0.0 for r in chosen.rings}
    taken = 0
    for rng in compiled.ranges:
        share[rng.ring] += (rng.hi - rng.lo) / BUCKETS
        taken += rng.hi - rng.lo
    share[chosen.default_ring.name] += (BUCKETS - taken) / BUCKETS
    return Expectation(config, chosen, compiled, share, {r.name: r.pool for r in chosen.rings})


def load_expectation(path: str | Path, route: str | None = None) -> Expectation:
    return expectation_for(load_config(path), route)


# ----------------------------------------------------------------------------- recording


@dataclass
class IdentityTally:
    predicted: str | None  # the ring the config predicts; None: unknown (no id yet)
    bucketed: bool  # assigned by sticky bucket (counts toward the weight shares)
    rings: Counter[str] = field(default_factory=Counter)


@dataclass
class Recorder:
    """Everything the report needs, fed one response at a time."""

    identities: dict[str, IdentityTally] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)  # ring -> ms
    errors: Counter[str] = field(default_factory=Counter)  # ring -> failed requests
    reasons: dict[str, Counter[str]] = field(default_factory=dict)  # ring -> X-Ring-Reason

    def identity(self, name: str, predicted: str | None, bucketed: bool) -> IdentityTally:
        tally = self.identities.get(name)
        if tally is None:
            tally = self.identities[name] = IdentityTally(predicted, bucketed)
        return tally

    def record(
        self,
        identity: str,
        ring: str | None,
        latency_ms: float,
        ok: bool,
        *,
        reason: str | None = None,
        predicted: str | None = None,
        bucketed: bool = False,
    ) -> None:
        row = ring or NO_RING
        self.latencies.setdefault(row, []).append(latency_ms)
        if not ok:
            self.errors[row] += 1
        if reason:
            self.reasons.setdefault(row, Counter())[reason] += 1
        if ring is not None:
            self.identity(identity, predicted, bucketed).rings[ring] += 1


# ----------------------------------------------------------------------------- report


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of unsorted ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def effective_n(weights: Iterable[int]) -> float:
    """Kish's effective sample size of a clustered sample: (sum w)^2 / sum w^2."""
    ws = [w for w in weights if w > 0]
    squares = sum(w * w for w in ws)
    return sum(ws) ** 2 / squares if squares else 0.0


def tolerance(p: float, n_eff: float, z: float = 4.0, floor: float = 0.02) -> float:
    """The allowed |observed - expected| for a share ``p`` seen over ``n_eff`` identities."""
    if n_eff <= 0:
        return math.inf
    return max(floor, z * math.sqrt(p * (1 - p) / n_eff))


@dataclass(frozen=True)
class RingRow:
    ring: str
    pool: str | None
    requests: int
    share: float  # of all requests
    bucket_requests: int  # requests of bucket-assigned identities answered by this ring
    bucket_share: float | None  # of all bucket-assigned requests
    expected: float | None  # the config's share of bucket-assigned requests
    weight: str  # "20 %", "rest", "rule"
    tolerance: float | None
    within: bool | None
    users: int
    errors: int
    error_rate: float
    p50: float | None
    p95: float | None
    p99: float | None
    reasons: dict[str, int]


@dataclass(frozen=True)
class Report:
    source: str
    route: str
    revision: str
    rows: tuple[RingRow, ...]
    total: RingRow
    users: int
    users_by_kind: dict[str, int]  # "user" (an id from the pool), "anonymous" (proxy's cookie)
    bucket_users: int
    effective_users: float
    split_users: int  # identities seen in two or more rings
    split_examples: tuple[str, ...]
    mismatched_users: int  # identities answered by a ring other than the predicted one
    mismatch_examples: tuple[str, ...]
    max_error_rate: float
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        def row(r: RingRow) -> dict[str, Any]:
            return {k: getattr(r, k) for k in RingRow.__dataclass_fields__}

        return {
            "config": self.source, "route": self.route, "revision": self.revision,
            "rings": {r.ring: row(r) for r in self.rows}, "total": row(self.total),
            "users": self.users, "users_by_kind": self.users_by_kind,
            "bucket_users": self.bucket_users,
            "effective_users": self.effective_users,
            "users_in_two_rings": self.split_users, "split_examples": list(self.split_examples),
            "users_not_in_predicted_ring": self.mismatched_users,
            "mismatch_examples": list(self.mismatch_examples),
            "error_rate": self.total.error_rate, "max_error_rate": self.max_error_rate,
            "failures": list(self.failures), "passed": self.passed,
        }


def build_report(
    recorder: Recorder,
    expectation: Expectation,
    max_error_rate: float = 0.01,
    z: float = 4.0,
    floor: float = 0.02,
) -> Report:
    ids = recorder.identities
    split = sorted(name for name, t in ids.items() if len(t.rings) > 1)
    mismatched = sorted(
        name for name, t in ids.items()
        if t.predicted is not None and any(r != t.predicted for r in t.rings)
    )
    bucketed = {name: t for name, t in ids.items() if t.bucketed}
    bucket_total = sum(sum(t.rings.values()) for t in bucketed.values())
    n_eff = effective_n(sum(t.rings.values()) for t in bucketed.values())

    total_requests = sum(len(v) for v in recorder.latencies.values())
    total_errors = sum(recorder.errors.values())
    ring_names = [r.name for r in expectation.route.rings]
    extra = sorted(set(recorder.latencies) - set(ring_names))  # unknown rings, (none)
    rows = []
    failures = []
    for name in ring_names + extra:
        lat = recorder.latencies.get(name, [])
        errors = recorder.errors.get(name, 0)
        in_ring = sum(t.rings[name] for t in bucketed.values())
        expected = expectation.bucket_share.get(name)
        share = in_ring / bucket_total if bucket_total else None
        tol = within = None
        if expected is not None and share is not None:
            tol = tolerance(expected, n_eff, z, floor)
            within = abs(share - expected) <= tol
            if not within:
                failures.append(
                    f"ring {name}: {share:.1%} of bucket-assigned requests, expected "
                    f"{expected:.1%} ± {tol:.1%}")
        rows.append(RingRow(
            ring=name, pool=expectation.pools.get(name), requests=len(lat),
            share=len(lat) / total_requests if total_requests else 0.0,
            bucket_requests=in_ring, bucket_share=share, expected=expected,
            weight=expectation.weight_label(name) if name in expectation.pools else "—",
            tolerance=tol, within=within,
            users=sum(1 for t in ids.values() if name in t.rings),
            errors=errors, error_rate=errors / len(lat) if lat else 0.0,
            p50=percentile(lat, 50), p95=percentile(lat, 95), p99=percentile(lat, 99),
            reasons=dict(recorder.reasons.get(name, {})),
        ))
    everything = [x for v in recorder.latencies.values() for x in v]
    total = RingRow(
        ring="all", pool=None, requests=total_requests, share=1.0 if total_requests else 0.0,
        bucket_requests=bucket_total, bucket_share=1.0 if bucket_total else None,
        expected=None, weight="", tolerance=None, within=None, users=len(ids),
        errors=total_errors,
        error_rate=total_errors / total_requests if total_requests else 0.0,
        p50=percentile(everything, 50), p95=percentile(everything, 95),
        p99=percentile(everything, 99), reasons={},
    )
    if total_requests == 0:
        failures.append("no requests were made")
    if total.error_rate > max_error_rate:
        failures.append(f"error rate {total.error_rate:.2%} is above {max_error_rate:.2%}")
    if split:
        failures.append(f"{len(split)} users were seen in two rings")
    if mismatched:
        failures.append(f"{len(mismatched)} users were not in the ring the config predicts "
                        "(a different config, or weights changed during the run?)")
    if extra and extra != [NO_RING]:
        failures.append(f"rings not in the config answered: {', '.join(x for x in extra)}")

    def example(name: str) -> str:
        t = ids[name]
        seen = ", ".join(f"{r} x{n}" for r, n in t.rings.most_common())
        return f"{name} (predicted {t.predicted or '?'}; seen {seen})"

    return Report(
        source=expectation.config.source, route=expectation.route.name,
        revision=expectation.config.revision, rows=tuple(rows), total=total,
        users=len(ids), users_by_kind=dict(Counter(n.partition(":")[0] for n in ids)),
        bucket_users=len(bucketed), effective_users=n_eff,
        split_users=len(split), split_examples=tuple(example(n) for n in split[:5]),
        mismatched_users=len(mismatched),
        mismatch_examples=tuple(example(n) for n in mismatched[:5]),
        max_error_rate=max_error_rate, failures=tuple(failures),
    )


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1%}"


def format_report(report: Report) -> str:
    head = ("ring", "pool", "requests", "share", "bucket share", "weight", "expected", "±tol",
            "", "users", "errors", "p50 ms", "p95 ms", "p99 ms")
    lines: list[tuple[str, ...]] = [head]
    for r in (*report.rows, report.total):
        lines.append((
            r.ring, r.pool or "", str(r.requests), _pct(r.share), _pct(r.bucket_share),
            r.weight, "" if r.expected is None else _pct(r.expected),
            "" if r.tolerance is None else f"±{r.tolerance:.1%}",
            "" if r.within is None else ("ok" if r.within else "OFF"),
            str(r.users), f"{r.errors} ({r.error_rate:.1%})",
            _ms(r.p50), _ms(r.p95), _ms(r.p99),
        ))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    left = {0, 1, 8}

    def fmt(row: tuple[str, ...]) -> str:
        cells = [c.ljust(w) if i in left else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    kinds = ", ".join(f"{n} {k}" for k, n in sorted(report.users_by_kind.items())) or "none"
    out = [f"ringproxy ring report: route {report.route} of {report.source} "
           f"(revision {report.revision})", ""]
    out += [fmt(row) for row in lines]
    out += [
        "",
        "share: of all requests.  bucket share: of the requests the proxy assigned by sticky",
        f"bucket ({report.bucket_users} users with an id, {report.effective_users:.0f} "
        "effective), against the share the weights give",
        "(the default ring gets the rest); requests a rule assigned (beta) are not in it.",
        "±tol: 4 standard errors over the effective users, at least 2 points.",
        f"users: {report.users} seen ({kinds}); in two rings: {report.split_users}; "
        f"not in the ring the config predicts: {report.mismatched_users}",
    ]
    out += [f"  two rings: {e}" for e in report.split_examples]
    out += [f"  unexpected ring: {e}" for e in report.mismatch_examples]
    out.append(f"errors: {report.total.errors} of {report.total.requests} "
               f"({report.total.error_rate:.2%}, limit {report.max_error_rate:.2%})")
    if report.passed:
        out.append("result: PASS")
    else:
        out += ["result: FAIL (exit code 1)"] + [f"  - {f}" for f in report.failures]
    return "\n".join(out)
