"""The per-ring token bucket (pure, on a given clock) and the ring limits' config:
``policy.rate_limit`` and ``policy.max_body``, their defaults, inheritance and errors; and
``decide``'s 429 with Retry-After, counted as the proxy's own refusal."""

from __future__ import annotations

import math
import textwrap

import pytest

from proxy.config import Config, parse_config
from proxy.config.ringlimits import RateLimit, ring_max_body
from proxy.dataplane.decide import RATE_LIMITED, Forward, LocalAnswer, decide
from proxy.dataplane.ratelimit import LogBudget, TokenBucket, retry_after
from proxy.dataplane.request import parse_request
from proxy.errors import ConfigError
from proxy.metrics import CODE_CLASSES, Metrics
from proxy.runtime import Runtime

# --------------------------------------------------------------------------- the bucket


def test_a_full_bucket_serves_its_burst_then_one_request_per_token() -> None:
    bucket = TokenBucket(10.0, 3, now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.take(100.0)
    assert wait == pytest.approx(0.1)  # one token every 100 ms
    assert bucket.take(100.05) == pytest.approx(0.05)
    assert bucket.take(100.1) == 0.0
    assert bucket.take(100.1) == pytest.approx(0.1)


def test_refused_requests_take_nothing_and_a_quiet_spell_refills_only_to_the_burst() -> None:
    bucket = TokenBucket(2.0, 2, now=0.0)
    bucket.take(0.0)
    bucket.take(0.0)
    for _ in range(100):  # clients hammering while empty do not push the next token away
        assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5) == 0.0
    # An hour of silence gives back `burst` tokens, not 7200.
    assert [bucket.take(3600.0) for _ in range(3)][:2] == [0.0, 0.0]
    assert bucket.take(3600.0) > 0


@pytest.mark.parametrize(("rate", "burst", "seconds"), [
    (200.0, 1, 3.0), (200.0, 20, 5.0), (7.5, 3, 10.0), (0.5, 1, 60.0), (10_000.0, 100, 2.0),
])
def test_accepted_over_a_window_is_burst_plus_rate_times_time(
    rate: float, burst: int, seconds: float
) -> None:
    """Offered at ten times the rate, what is taken is burst + rate x time."""
    bucket = TokenBucket(rate, burst, now=0.0)
    accepted = 0
    per_second = rate * 10
    steps = round(seconds * per_second)
    for i in range(steps + 1):
        if bucket.take(i / per_second) == 0.0:
            accepted += 1
    expected = burst + math.floor(rate * seconds + 1e-9)
    assert abs(accepted - expected) <= 1, (accepted, expected)


def test_a_clock_that_steps_back_refills_nothing() -> None:
    bucket = TokenBucket(1.0, 1, now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(5.0) == pytest.approx(1.0)  # still 1 s from the stamp
    assert bucket.take(11.0) == 0.0


def test_retry_after_is_the_wait_rounded_up_at_least_one_second() -> None:
    assert [retry_after(w) for w in (0.001, 0.5, 1.0, 1.01, 2.0, 59.2)] == [1, 1, 1, 2, 2, 60]


def test_a_bucket_refuses_a_nonsense_rate() -> None:
    with pytest.raises(ValueError, match="rate > 0"):
        TokenBucket(0.0, 1, 0.0)
    with pytest.raises(ValueError, match="burst >= 1"):
        TokenBucket(1.0, 0, 0.0)


# --------------------------------------------------------------------------- config

BASE = """
listen: 127.0.0.1:0
pools:
  a: {servers: ["http://127.0.0.1:9001"]}
  b: {servers: ["http://127.0.0.1:9002"]}
routes:
  - name: api
"""


def parse(routes: str) -> Config:
    return parse_config(BASE + textwrap.indent(textwrap.dedent(routes), "    "),
                        source="c.yaml", environ={})


def errors_of(routes: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(routes)
    return str(info.value).splitlines()


def test_rate_limit_and_max_body_are_read_with_defaults_and_route_inheritance() -> None:
    config = parse("""
        max_body: 10MiB
        policy: {rate_limit: {requests_per_second: 50}, max_body: 1MiB}
        rings:
          - name: beta
            pool: b
            rules: [{attr: "header:X-Beta", exists: true}]
            policy: {rate_limit: {requests_per_second: 2.5, burst: 10}, max_body: 64KiB}
          - name: slow
            pool: b
            rules: [{attr: "header:X-Slow", exists: true}]
            policy: {rate_limit: {requests_per_second: 0.5}, max_body: 20MiB}
          - name: main
            pool: a
    """)
    beta, slow, main = config.routes[0].rings
    assert beta.policy.rate_limit == RateLimit(2.5, 10)
    assert beta.policy.max_body == 64 << 10
    assert slow.policy.rate_limit == RateLimit(0.5, 1)  # burst: the rate rounded up, >= 1
    assert main.policy.rate_limit == RateLimit(50.0, 50)  # the route's policy
    assert main.policy.max_body == 1 << 20
    # The route's max_body holds too: the smaller applies.
    runtime = Runtime(config)
    assert [r.max_body for r in runtime.rings["api"]] == [64 << 10, 10 << 20, 1 << 20]
    assert ring_max_body(None, None) is None and ring_max_body(None, 5) == 5


@pytest.mark.parametrize(("policy", "expected"), [
    ("{rate_limit: {requests_per_second: 0}}",
     "policy.rate_limit.requests_per_second: 0 is not a rate; expected a number above 0"),
    ("{rate_limit: {requests_per_second: '200'}}",
     "policy.rate_limit.requests_per_second: '200' is not a rate"),
    ("{rate_limit: {requests_per_second: 10, burst: 0}}",
     "policy.rate_limit.burst: 0 is outside 1..10000000"),
    ("{rate_limit: {burst: 5}}", "policy.rate_limit.requests_per_second: is required"),
    ("{rate_limit: {rps: 5, requests_per_second: 5}}",
     "policy.rate_limit.rps: unknown key (known keys: burst, requests_per_second)"),
    ("{rate_limit: 200}", "policy.rate_limit: expected a mapping, got a int"),
    ("{max_body: 0}", "policy.max_body: 0 is not a limit; leave max_body out for no limit"),
    ("{max_body: 1MB}", "policy.max_body: '1MB' is not a size"),
])
def test_ring_limit_errors_name_the_path_and_what_to_write(policy: str, expected: str) -> None:
    errors = errors_of(f"""
        rings:
          - name: main
            pool: a
            policy: {policy}
    """)
    assert any(expected in e for e in errors), errors
    assert all(e.startswith("c.yaml:") for e in errors)


# --------------------------------------------------------------------------- decide


def test_decide_answers_429_with_retry_after_once_the_ring_is_out_of_tokens() -> None:
    config = parse("""
        rings:
          - name: beta
            pool: b
            rules: [{attr: "header:X-Beta", exists: true}]
            policy: {rate_limit: {requests_per_second: 0.25, burst: 2}}
          - name: main
            pool: a
    """)
    runtime = Runtime(config)
    beta = parse_request(b"GET / HTTP/1.1\r\nHost: x\r\nX-Beta: 1\r\n\r\n")
    main = parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    steps = [decide(runtime, beta, "r") for _ in range(3)]
    assert [type(s) for s in steps] == [Forward, Forward, LocalAnswer]
    refused = steps[2]
    assert isinstance(refused, LocalAnswer)
    assert (refused.status, refused.error, refused.retry_after) == (429, RATE_LIMITED, False)
    assert refused.extra == b"Retry-After: 4\r\n"  # a token every 4 s
    assert refused.ring is not None and refused.ring.name == "beta"
    # Another ring has its own bucket (none here): untouched.
    assert all(isinstance(decide(runtime, main, "r"), Forward) for _ in range(20))


def test_a_ring_whose_pool_is_down_takes_no_token_for_the_ring_that_serves_instead() -> None:
    config = parse("""
        rings:
          - name: beta
            pool: b
            rules: [{attr: "header:X-Beta", exists: true}]
            on_pool_down: next_ring
            policy: {rate_limit: {requests_per_second: 0.01, burst: 2}}
          - name: main
            pool: a
    """)
    runtime = Runtime(config)
    beta_ring = runtime.rings["api"][0]
    beta = parse_request(b"GET / HTTP/1.1\r\nHost: x\r\nX-Beta: 1\r\n\r\n")
    pool = beta_ring.pool
    pool.all_up = False
    for server in pool.servers:
        server.up = False
    served = [decide(runtime, beta, "r") for _ in range(5)]  # beta's pool is down
    assert all(isinstance(s, Forward) and s.ring.name == "main" for s in served)
    pool.all_up = True
    for server in pool.servers:
        server.up = True
    # Back up: beta still has its whole burst (the fallbacks took none of its tokens).
    again = [decide(runtime, beta, "r") for _ in range(3)]
    assert [type(s) for s in again] == [Forward, Forward, LocalAnswer]
    assert all(s.ring is not None and s.ring.name == "beta" for s in again)


def test_a_rate_limit_429_is_counted_refused_and_never_judged() -> None:
    config = parse("""
        rings:
          - name: main
            pool: a
            policy: {rate_limit: {requests_per_second: 1}}
    """)
    metrics = Metrics(process_metrics=False)
    runtime = Runtime(config)
    metrics.attach(runtime)
    recorder = runtime.rings["api"][0].recorder
    assert recorder is not None
    for _ in range(50):
        recorder.record(429, RATE_LIMITED, 0.0001, 0, 0, 1.0)
    refused = CODE_CLASSES.index("refused")
    assert recorder.requests[refused] == 50  # type: ignore[attr-defined]
    assert recorder.tally.requests == 0  # type: ignore[attr-defined]


def test_a_log_budget_writes_a_burst_then_its_rate_and_counts_what_it_dropped() -> None:
    budget = LogBudget(2.0, 3)
    assert [budget.allow(100.0) for _ in range(5)] == [0, 0, 0, None, None]
    assert budget.allow(100.2) is None  # 0.4 of a token
    assert budget.allow(100.5) == 3  # a token again: the line says three went unlogged
    assert budget.allow(100.5) is None
    assert budget.allow(110.0) == 1
    assert [budget.allow(110.0) for _ in range(3)] == [0, 0, None]  # refilled to 3, not 20
    budget.allow(110.0)
    budget.refill()
    assert [budget.allow(110.0) for _ in range(4)] == [0, 0, 0, None]
