"""A check's result is not kept past its time (pure: ``proxy.checks.runner.fresh``)."""

from __future__ import annotations

from proxy.checks.results import Result, Status, pending
from proxy.checks.runner import fresh
from proxy.config.checks import ExternalCheck, OnFail, PrometheusQuery, RingHealthCheck

CHECK = ExternalCheck("conv", PrometheusQuery("http://prom:9090", "up", timeout=5.0), min=0.5,
                      interval=30.0)
HEALTH = RingHealthCheck("db", "/health", interval=10.0, timeout=2.0)


def passed(at: float, name: str = "conv") -> Result:
    return Result(name, "prometheus", Status.PASS, 0.9, ">= 0.5", 0.5, OnFail.ROLLBACK,
                  "0.9 (bound >= 0.5)", at)


def test_a_result_within_two_intervals_and_the_timeout_is_kept() -> None:
    result = passed(1000.0)
    assert fresh(result, CHECK, 1000.0 + 65.0) is result  # 2 x 30 s + 5 s
    assert fresh(None, CHECK, 5000.0) is None


def test_an_older_pass_is_no_data_saying_why() -> None:
    stale = fresh(passed(1000.0), CHECK, 1000.0 + 66.0)
    assert stale is not None and stale.status is Status.NO_DATA and stale.value is None
    assert stale.detail.startswith("stale: the last result is 66s old (was pass")
    failing = Result("db", "health", Status.FAIL, 503.0, "2xx-3xx", None, OnFail.ROLLBACK,
                     "answered 503", 1000.0, failures=2, threshold=3)
    old = fresh(failing, HEALTH, 1000.0 + 23.0)  # 2 x 10 s + 2 s
    assert old is not None and old.status is Status.NO_DATA and old.failures == 0
    assert fresh(failing, HEALTH, 1000.0 + 21.0) is failing


def test_pending_is_never_stale() -> None:
    waiting = pending("conv", "prometheus", ">= 0.5", 0.5, OnFail.ROLLBACK, 1, 1000.0)
    assert fresh(waiting, CHECK, 99999.0) is waiting
