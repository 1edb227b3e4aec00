"""HealthChecker: aggregation, liveness vs readiness, built-in checks."""

from __future__ import annotations

import pybreaker
import pytest

from hf_kvcache_plugin import BreakerConfig, HealthConfig
from hf_kvcache_plugin.resilience import (
    CheckResult,
    HealthChecker,
    HealthStatus,
    MemoryPressureProbe,
    ServingMetrics,
    breaker_check,
    consistency_check,
    create_breaker,
    peers_check,
    system_memory_used_fraction,
)


def test_worst_status_wins_with_reasons_worst_first():
    checker = HealthChecker()
    checker.register("a", CheckResult.healthy)
    assert checker.readiness().status is HealthStatus.HEALTHY and checker.readiness().ok
    checker.register("b", lambda: CheckResult.degraded("breaker open"))
    checker.register("c", lambda: CheckResult.unhealthy("memory critical"))
    report = checker.readiness()
    assert report.status is HealthStatus.UNHEALTHY and not report.ok
    assert report.reasons == ["c: memory critical", "b: breaker open"]
    assert report.to_dict()["checks"]["a"] == {"status": "healthy", "reason": ""}
    checker.unregister("c")
    assert checker.readiness().status is HealthStatus.DEGRADED and checker.readiness().ok


def test_liveness_runs_only_liveness_checks():
    checker = HealthChecker()
    checker.register("memory", lambda: CheckResult.unhealthy("critical"))
    assert checker.liveness().status is HealthStatus.HEALTHY  # a degraded dependency never restarts the process
    checker.register("event-loop", lambda: CheckResult.unhealthy("stuck"), liveness=True)
    assert checker.liveness().status is HealthStatus.UNHEALTHY
    assert list(checker.liveness().checks) == ["event-loop"]


def test_a_raising_check_reports_its_error_and_on_error_status():
    checker = HealthChecker()

    def broken():
        raise ConnectionError("store down")

    checker.register("store", broken)
    checker.register("peers", broken, on_error=HealthStatus.UNHEALTHY)
    checker.register("wrong", lambda: True)
    report = checker.readiness()
    assert report.checks["store"] == CheckResult.degraded("check raised ConnectionError: store down")
    assert report.checks["peers"].status is HealthStatus.UNHEALTHY
    assert "returned bool, not a CheckResult" in report.checks["wrong"].reason


def test_registration_errors():
    checker = HealthChecker()
    checker.register("x", CheckResult.healthy)
    with pytest.raises(ValueError, match="named 'x' is registered already"):
        checker.register("x", CheckResult.healthy)
    with pytest.raises(ValueError, match="has to be callable"):
        checker.register("y", 3)
    with pytest.raises(ValueError, match="non-empty name"):
        checker.register("", CheckResult.healthy)
    with pytest.raises(ValueError, match=r"no health check named 'z'; registered: \['x'\]"):
        checker.unregister("z")


@pytest.mark.parametrize(
    "used,level,status",
    [
        (0.10, "low", HealthStatus.HEALTHY),
        (0.70, "moderate", HealthStatus.HEALTHY),
        (0.85, "high", HealthStatus.DEGRADED),
        (0.95, "critical", HealthStatus.UNHEALTHY),
        (1.00, "critical", HealthStatus.UNHEALTHY),
    ],
)
def test_memory_pressure_levels(used, level, status):
    metrics = ServingMetrics()
    probe = MemoryPressureProbe(HealthConfig(), read_used_fraction=lambda: used, metrics=metrics)
    assert probe.level() == level
    result = probe.check()
    assert result.status is status and f"{used:.0%} used ({level})" in result.reason
    assert metrics.value("hf_kvcache_memory_used_ratio") == used


def test_real_memory_reading_is_a_fraction():
    assert 0.0 < system_memory_used_fraction() < 1.0
    assert MemoryPressureProbe().level() in ("low", "moderate", "high", "critical")


def test_breaker_check_degrades_while_any_breaker_is_open():
    store = create_breaker("store", BreakerConfig(fail_max=1), clock=lambda: 0.0)
    peer = create_breaker("peer-2", BreakerConfig(fail_max=1), clock=lambda: 0.0)
    check = breaker_check([store, peer])
    assert check().status is HealthStatus.HEALTHY
    with pytest.raises(ConnectionError):
        peer.call(lambda: (_ for _ in ()).throw(ConnectionError()))
    assert peer.current_state == pybreaker.STATE_OPEN
    assert check() == CheckResult.degraded("circuit breakers not closed (peer-2 open): serving without them")


def test_consistency_and_peer_checks():
    problems: list[str] = []
    check = consistency_check(lambda: problems, "prefix store")
    assert check().status is HealthStatus.HEALTHY
    problems.append("used_bytes 100 != sum of entries 96")
    assert check() == CheckResult.degraded("prefix store inconsistent: used_bytes 100 != sum of entries 96")

    alive = {"rank1": True, "rank2": True}
    check = peers_check(lambda: alive)
    assert check().status is HealthStatus.HEALTHY
    alive["rank2"] = False
    assert check() == CheckResult.degraded("1 of 2 peer(s) unreachable ['rank2']: serving locally")


def test_the_specification_names_register_and_aggregate_every_check():
    checker = HealthChecker()
    checker.register_check("cache", lambda: CheckResult.healthy("ok"))
    assert checker.get_overall_health().status is HealthStatus.HEALTHY
    checker.register_check("store", lambda: CheckResult.unhealthy("unreachable"))
    health = checker.get_overall_health()
    assert health.status is HealthStatus.UNHEALTHY and health.reasons == ["store: unreachable"]
    assert health == checker.readiness()
    with pytest.raises(ValueError, match="named 'cache' is registered already"):
        checker.register_check("cache", CheckResult.healthy)
