"""Resilience: circuit breakers, health, metrics, rate limits and graceful degradation.

One module per concern: ``metrics`` (Prometheus, a registry per instance),
``breakers`` (pybreaker with an injectable clock), ``health`` (checks and
their aggregation), ``liveness`` (a stuck serving loop), ``probe_server`` (``/healthz``, ``/readyz``, ``/metrics``
over HTTP), ``rate_limit`` (token buckets per client), ``degradation``
(``GuardedStore``, ``harden_cache``) and ``endpoint`` (``ServingEndpoint``: a
request never fails because the cache did). ``app.service.build_service``
wires them from a config.
"""

from .breakers import BreakerMetricsListener, CircuitBreaker, CircuitGuard, MonotonicClockStorage, create_breaker
from .degradation import GuardedStore, ProductionCacheWrapper, StoreMiss, harden_cache
from .endpoint import ServingEndpoint, check_prompt
from .health import (
    CheckResult,
    HealthChecker,
    HealthReport,
    HealthStatus,
    MemoryPressureProbe,
    breaker_check,
    consistency_check,
    peers_check,
    system_memory_used_fraction,
)
from .liveness import ProgressWatch
from .probe_server import HealthServer
from .metrics import PRESSURE_LEVELS, MetricsCollector, ServingMetrics
from .rate_limit import RateLimiter, RateLimitExceeded

__all__ = [
    "PRESSURE_LEVELS",
    "BreakerMetricsListener",
    "CheckResult",
    "CircuitBreaker",
    "CircuitGuard",
    "GuardedStore",
    "HealthChecker",
    "HealthReport",
    "HealthServer",
    "HealthStatus",
    "MemoryPressureProbe",
    "MetricsCollector",
    "MonotonicClockStorage",
    "ProductionCacheWrapper",
    "ProgressWatch",
    "RateLimitExceeded",
    "RateLimiter",
    "ServingEndpoint",
    "ServingMetrics",
    "StoreMiss",
    "breaker_check",
    "check_prompt",
    "consistency_check",
    "create_breaker",
    "harden_cache",
    "peers_check",
    "system_memory_used_fraction",
]
