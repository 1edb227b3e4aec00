"""Serving hardening: circuit breakers, health, metrics, rate limits and graceful degradation.

One module per concern: ``metrics`` (Prometheus, a registry per instance),
``breakers`` (pybreaker with an injectable clock), ``health`` (checks and
their aggregation), ``http`` (``/healthz``, ``/readyz``, ``/metrics``),
``rate_limit`` (token buckets per client), ``degradation`` (``GuardedStore``,
``harden_cache``), ``endpoint`` (``ServingEndpoint``: a request never fails
because the cache did) and ``service`` (all of it wired from a config, and
``hf-kvcache serve``).
"""

from .breakers import BreakerMetricsListener, CircuitGuard, MonotonicClockStorage, create_breaker
from .degradation import GuardedStore, StoreMiss, harden_cache
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
from .http import HealthServer
from .metrics import PRESSURE_LEVELS, ServingMetrics
from .rate_limit import RateLimiter, RateLimitExceeded
from .service import ServingService, build_service

__all__ = [
    "PRESSURE_LEVELS",
    "BreakerMetricsListener",
    "CheckResult",
    "CircuitGuard",
    "GuardedStore",
    "HealthChecker",
    "HealthReport",
    "HealthServer",
    "HealthStatus",
    "MemoryPressureProbe",
    "MonotonicClockStorage",
    "RateLimitExceeded",
    "RateLimiter",
    "ServingEndpoint",
    "ServingMetrics",
    "ServingService",
    "StoreMiss",
    "breaker_check",
    "build_service",
    "check_prompt",
    "consistency_check",
    "create_breaker",
    "harden_cache",
    "peers_check",
    "system_memory_used_fraction",
]
