"""Circuit breakers: thresholds, excluded errors, reset timeout on an injected clock, metrics and logs."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

import pybreaker
import pytest

from hf_kvcache_plugin import BreakerConfig
from hf_kvcache_plugin.resilience import (
    CircuitBreaker,
    CircuitGuard,
    MonotonicClockStorage,
    ServingMetrics,
    create_breaker,
)


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def no_sleeping(monkeypatch):
    def refuse(seconds):
        raise AssertionError(f"a test slept for {seconds} s")

    monkeypatch.setattr(time, "sleep", refuse)


def failing():
    raise ConnectionError("store unreachable")


def ok():
    return "ok"


def trip(breaker, times):
    for _ in range(times):
        with pytest.raises((ConnectionError, pybreaker.CircuitBreakerError)):
            breaker.call(failing)


def test_opens_after_fail_max_and_rejects_without_calling():
    breaker = create_breaker("store", BreakerConfig(fail_max=3), clock=FakeClock())
    trip(breaker, 2)
    assert breaker.current_state == "closed"
    with pytest.raises(ConnectionError):  # the tripping call raises its own error, not CircuitBreakerError
        breaker.call(failing)
    assert breaker.current_state == "open"
    calls = []
    with pytest.raises(pybreaker.CircuitBreakerError):
        breaker.call(lambda: calls.append(1))
    assert calls == []


def test_a_success_resets_the_failure_count():
    breaker = create_breaker("store", BreakerConfig(fail_max=2), clock=FakeClock())
    trip(breaker, 1)
    assert breaker.call(ok) == "ok"
    trip(breaker, 1)
    assert breaker.current_state == "closed"


def test_value_errors_never_trip_the_breaker():
    breaker = create_breaker("store", BreakerConfig(fail_max=1), clock=FakeClock())

    def bad_input():
        raise ValueError("`token_ids` has to be 1-d")

    for _ in range(5):
        with pytest.raises(ValueError, match="has to be 1-d"):
            breaker.call(bad_input)
    assert breaker.current_state == "closed" and breaker.fail_counter == 0


def test_reset_timeout_is_measured_on_the_injected_clock():
    clock = FakeClock()
    breaker = create_breaker("store", BreakerConfig(fail_max=1, reset_timeout_s=30), clock=clock)
    trip(breaker, 1)
    clock.advance(29.9)
    with pytest.raises(pybreaker.CircuitBreakerError, match="still open"):
        breaker.call(ok)
    clock.advance(0.2)
    assert breaker.call(ok) == "ok"  # the trial call, half-open -> closed
    assert breaker.current_state == "closed"


def test_storage_measures_the_open_time_on_the_injected_clock():
    clock = FakeClock()
    storage = MonotonicClockStorage(clock=clock)
    assert storage.opened_at is None
    # pybreaker passes a wall-clock datetime; a wrong one (a clock jump) makes no difference
    storage.opened_at = datetime(2000, 1, 1, tzinfo=timezone.utc)
    clock.advance(12.5)
    elapsed = (datetime.now(timezone.utc) - storage.opened_at).total_seconds()
    assert elapsed == pytest.approx(12.5, abs=0.5)


def test_half_open_needs_success_threshold_successes_and_a_trial_failure_reopens():
    clock = FakeClock()
    breaker = create_breaker("peer-1", BreakerConfig(fail_max=1, reset_timeout_s=10, success_threshold=2), clock=clock)
    trip(breaker, 1)
    clock.advance(10)
    assert breaker.call(ok) == "ok"
    assert breaker.current_state == "half-open"
    with pytest.raises(ConnectionError):  # the failed trial's own error
        breaker.call(failing)
    assert breaker.current_state == "open"
    clock.advance(10)
    breaker.call(ok)
    breaker.call(ok)
    assert breaker.current_state == "closed"


def test_listener_feeds_metrics_and_logs(caplog):
    clock, metrics = FakeClock(), ServingMetrics()
    breaker = create_breaker("store", BreakerConfig(fail_max=2, reset_timeout_s=5), metrics=metrics, clock=clock)
    def state(name):
        return metrics.value("hf_kvcache_breaker_state", breaker="store", hf_kvcache_breaker_state=name)

    assert state("closed") == 1.0
    with caplog.at_level(logging.INFO, logger="hf_kvcache_plugin.resilience.breakers"):
        trip(breaker, 2)
        assert state("open") == 1.0 and state("closed") == 0.0
        clock.advance(5)
        breaker.call(ok)
    assert state("closed") == 1.0
    assert metrics.value("hf_kvcache_breaker_opens_total", breaker="store") == 1
    assert metrics.value("hf_kvcache_breaker_recoveries_total", breaker="store") == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("'store' opened" in m and "ConnectionError('store unreachable')" in m for m in messages)
    assert any("'store' closed again" in m for m in messages)


def test_guard_falls_back_counts_by_kind_and_reraises_bad_input():
    clock, metrics = FakeClock(), ServingMetrics()
    breaker = create_breaker("peer", BreakerConfig(fail_max=2), metrics=metrics, clock=clock)
    guard = CircuitGuard(breaker, "peer", metrics)
    assert guard.call(ok, fallback=lambda: "local") == "ok"
    with pytest.raises(ValueError, match="bad key"):
        guard.call(lambda: (_ for _ in ()).throw(ValueError("bad key")), fallback=lambda: "local")
    assert guard.call(failing, fallback=lambda: "local", operation="fetch") == "local"

    def timeout():
        raise TimeoutError("peer did not answer")

    assert guard.call(timeout, fallback=lambda: "local", operation="fetch") == "local"  # opens the breaker
    assert guard.state == "open"
    assert guard.call(ok, fallback=lambda: "local", operation="fetch") == "local"  # rejected while open

    errors = lambda kind: metrics.value("hf_kvcache_errors_total", component="peer", kind=kind)  # noqa: E731
    def fallbacks(reason):
        return metrics.value("hf_kvcache_fallbacks_total", component="peer", operation="fetch", reason=reason)

    assert errors("ConnectionError") == 1 and errors("TimeoutError") == 1 and errors("ValueError") == 1
    assert fallbacks("error") == 2 and fallbacks("breaker_open") == 1


def test_circuit_breaker_protect_opens_after_fail_max_and_reports_it():
    metrics = ServingMetrics()
    breaker = CircuitBreaker("cache-service", BreakerConfig(fail_max=2, reset_timeout_s=5), metrics=metrics,
                             clock=FakeClock())
    assert isinstance(breaker, pybreaker.CircuitBreaker) and breaker.name == "cache-service"
    calls = []

    @breaker.protect
    def cache_operation(fail: bool) -> str:
        calls.append(fail)
        if fail:
            raise ConnectionError("down")
        return "value"

    assert cache_operation(False) == "value" and cache_operation.__name__ == "cache_operation"
    for _ in range(2):
        with pytest.raises(ConnectionError):
            cache_operation(True)
    assert breaker.current_state == "open"
    with pytest.raises(pybreaker.CircuitBreakerError):
        cache_operation(False)
    assert calls == [False, True, True]  # rejected while open, without running
    assert metrics.value("hf_kvcache_breaker_opens_total", breaker="cache-service") == 1
    with pytest.raises(ValueError, match="`protect` decorates a function but got int"):
        breaker.protect(3)
    with pytest.raises(ValueError, match="non-empty `name` but got ''"):
        CircuitBreaker("")
    assert isinstance(create_breaker("store"), CircuitBreaker)
