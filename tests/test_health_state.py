"""The pure health core: ejection, its growth and cap, check thresholds, the retry budget."""

from __future__ import annotations

import pytest

from proxy.config.health import HealthCheck, Outlier, Retries
from proxy.health.retry import RetryBudget, failure_reason, retryable
from proxy.health.state import EJECTED, HEALTHY, READMITTED, UNHEALTHY, PoolHealthState

URLS = ["http://a:1", "http://b:1", "http://c:1", "http://d:1"]


def pool(n: int = 2, outlier: Outlier | None = None,
         check: HealthCheck | None = None) -> PoolHealthState:
    return PoolHealthState("p", URLS[:n], outlier or Outlier(), check)


def fail(state: PoolHealthState, i: int, times: int, now: float = 0.0) -> list[str]:
    return [c.kind for _ in range(times) if (c := state.failure(i, "reset", now))]


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    state = pool()
    assert fail(state, 0, 4) == []
    state.success(0)
    assert fail(state, 0, 4) == []
    change = state.failure(0, "connect", 10.0)
    assert change is not None and change.kind == EJECTED and change.duration == 30.0
    assert change.one_host and "one host" in change.text()
    assert not state.servers[0].available and state.servers[0].ejected_until == 40.0
    assert state.available_count() == 1


def test_ejection_time_grows_with_ejections_in_a_row_up_to_max_ejection() -> None:
    state = pool(outlier=Outlier(consecutive_failures=1, base_ejection=10.0,
                                 max_ejection=25.0))
    durations = []
    now = 0.0
    for _ in range(4):
        change = state.failure(0, "reset", now)
        assert change is not None and change.duration is not None
        durations.append(change.duration)
        now += change.duration
        assert state.readmit(0, now) is not None
    assert durations == [10.0, 20.0, 25.0, 25.0]


def test_time_back_in_pays_the_multiplier_down() -> None:
    state = pool(outlier=Outlier(consecutive_failures=1, base_ejection=10.0))
    state.failure(0, "reset", 0.0)
    state.readmit(0, 10.0)
    state.failure(0, "reset", 10.0)  # again at once: x2
    state.readmit(0, 30.0)
    change = state.failure(0, "reset", 30.0 + 25.0)  # 2 calm periods: back to x1
    assert change is not None and change.duration == 10.0


@pytest.mark.parametrize(("servers", "percent", "most"), [
    (1, 50, 0), (2, 50, 1), (3, 50, 1), (4, 50, 2), (4, 100, 4), (4, 0, 0), (3, 34, 1)])
def test_never_more_than_max_ejection_percent_out_at_once(
        servers: int, percent: int, most: int) -> None:
    state = pool(servers, Outlier(consecutive_failures=2, max_ejection_percent=percent))
    for i in range(servers):
        fail(state, i, 2)
    assert state.ejected_count() == most
    # The ones over the cap keep failing visibly and keep counting.
    assert all(s.failures == 2 for s in state.servers if not s.ejected)


def test_readmission_only_for_an_ejected_server_and_off_means_never_ejected() -> None:
    state = pool()
    assert state.readmit(1, 5.0) is None
    fail(state, 1, 5)
    change = state.readmit(1, 35.0)
    assert change is not None and change.kind == READMITTED
    assert state.servers[1].available and state.servers[1].failures == 0
    off = PoolHealthState("p", URLS[:2], None, None)
    assert fail(off, 0, 50) == [] and off.servers[0].available


def test_check_thresholds_take_a_server_out_and_bring_it_back() -> None:
    check = HealthCheck("/hz", healthy_threshold=2, unhealthy_threshold=3)
    state = pool(check=check)
    seen = [state.checked(0, False, "timeout") for _ in range(3)]
    assert seen[:2] == [None, None] and seen[2] is not None and seen[2].kind == UNHEALTHY
    assert state.servers[0].state == UNHEALTHY and not state.servers[0].available
    assert state.checked(0, True, "200") is None
    assert state.checked(0, False, "503") is None  # a failure breaks the streak
    assert state.checked(0, True, "200") is None
    back = state.checked(0, True, "200")
    assert back is not None and back.kind == HEALTHY and state.servers[0].available
    assert state.servers[0].last_check == "200"


def test_a_pool_whose_every_server_is_out_is_not_one_hosts_fault() -> None:
    state = pool(check=HealthCheck("/hz", unhealthy_threshold=1))
    first = state.checked(0, False, "refused")
    second = state.checked(1, False, "refused")
    assert first is not None and first.one_host
    assert second is not None and not second.one_host and state.available_count() == 0
    assert "0 of 2 servers in rotation" in second.text()
    alone = PoolHealthState("p", URLS[:1], None, HealthCheck("/hz", unhealthy_threshold=1))
    change = alone.checked(0, False, "timeout")
    assert change is not None and not change.one_host  # no other server to be healthy


def test_retry_budget_is_a_share_of_requests_in_the_last_ten_seconds() -> None:
    first = RetryBudget(1.0, 0)
    first.request(1000.0)  # the very first request counts (the window starts with it)
    assert first.allow(1000.5) and not first.allow(1000.5)
    budget = RetryBudget(0.2, 3)
    assert [budget.allow(0.0) for _ in range(4)] == [True, True, True, False]
    for _ in range(50):
        budget.request(1.0)
    allowed = sum(budget.allow(1.5) for _ in range(100))
    assert allowed == 10 - 3  # 20 % of 50, three already spent
    assert budget.denied == 1 + 93
    # Ten seconds on, the window has forgotten both.
    assert [budget.allow(12.0) for _ in range(4)] == [True, True, True, False]


def test_retry_budget_slots_expire_one_second_at_a_time() -> None:
    budget = RetryBudget(0.5, 0)
    for second in range(10):
        budget.request(float(second))
        budget.request(float(second))
    assert sum(budget.allow(9.5) for _ in range(20)) == 10
    # At 10.2 the requests of second 0 have left the window: 18 requests, 9 retries.
    assert not budget.allow(10.2)


def test_what_may_be_retried() -> None:
    retries = Retries()
    assert retryable(retries, "GET", True, 1)
    assert not retryable(retries, "GET", True, 2)  # attempts: 1 retry
    assert not retryable(retries, "POST", True, 1)
    assert not retryable(retries, "PUT", False, 1)  # a streamed body is gone
    assert failure_reason("connect") == "connect_failure"
    assert failure_reason("bad_response") is None
    assert retries.retries_status(503) and not retries.retries_status(500)
