"""Circuit breakers (``pybreaker``) around store and coordinator calls, and the guard that falls back.

A breaker wraps calls that leave the process's own memory: prefix store
lookups and inserts, coordinator calls to peers. It is never put inside the
per-token ``update`` of the cache: that path has nothing remote to fail.

- ``CircuitBreaker`` is a ``pybreaker.CircuitBreaker`` with a
  ``BreakerConfig``'s thresholds and ``protect`` (a decorator);
  ``create_breaker`` builds one. ``ValueError`` (configuration and
  validation errors) is excluded: bad input is the caller's fault and must
  not open the circuit.
- ``MonotonicClockStorage`` times ``reset_timeout`` on a monotonic clock that
  can be injected (pybreaker itself reads ``datetime.now()``).
- ``BreakerMetricsListener`` turns state changes into metrics and log lines.
- ``CircuitGuard`` calls through a breaker and turns failures and an open
  circuit into a fallback value, counted by kind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import pybreaker

from ..config import BreakerConfig
from .metrics import ServingMetrics

__all__ = ["BreakerMetricsListener", "CircuitBreaker", "CircuitGuard", "MonotonicClockStorage", "create_breaker"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]


class MonotonicClockStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's in-memory state with the open time taken from ``clock`` (default ``time.monotonic``).

    pybreaker stamps ``opened_at`` with ``datetime.now()`` and later checks
    ``datetime.now() < opened_at + reset_timeout``. Wall-clock time jumps with
    NTP and cannot be driven by a test, so this storage records the open time
    on ``clock`` and reports ``opened_at`` as "now minus the elapsed ``clock``
    time": the comparison then holds exactly when ``reset_timeout`` has passed
    on ``clock``. This is pybreaker's own extension point (its state storage);
    nothing global is patched.
    """

    def __init__(self, state: str = pybreaker.STATE_CLOSED, clock: Clock = time.monotonic):
        super().__init__(state)
        self._clock = clock
        self._opened_at_clock: float | None = None

    @property
    def opened_at(self) -> datetime | None:
        if self._opened_at_clock is None:
            return None
        return datetime.now(timezone.utc) - timedelta(seconds=self._clock() - self._opened_at_clock)

    @opened_at.setter
    def opened_at(self, _wall_time: datetime) -> None:
        self._opened_at_clock = self._clock()


class BreakerMetricsListener(pybreaker.CircuitBreakerListener):
    """Feeds state changes to ``ServingMetrics`` (state, opens, recoveries) and to the log."""

    def __init__(self, metrics: ServingMetrics | None = None):
        self.metrics = metrics
        self._last_error: dict[str, BaseException] = {}

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        self._last_error[cb.name] = exc

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        old = old_state.name if old_state is not None else None
        if self.metrics is not None:
            self.metrics.breaker_state.labels(cb.name).state(new_state.name)
        if new_state.name == pybreaker.STATE_OPEN:
            if self.metrics is not None:
                self.metrics.breaker_opens.labels(cb.name).inc()
            logger.warning(
                "circuit breaker %r opened (%s -> open, last error: %r); calls fall back for %.1f s",
                cb.name, old, self._last_error.get(cb.name), cb.reset_timeout,
            )  # fmt: skip
        elif new_state.name == pybreaker.STATE_HALF_OPEN:
            logger.info("circuit breaker %r half-open: letting a trial call through", cb.name)
        elif new_state.name == pybreaker.STATE_CLOSED and old == pybreaker.STATE_HALF_OPEN:
            if self.metrics is not None:
                self.metrics.breaker_recoveries.labels(cb.name).inc()
            logger.info("circuit breaker %r closed again: calls go through", cb.name)


class CircuitBreaker(pybreaker.CircuitBreaker):
    """A ``pybreaker.CircuitBreaker`` named ``name`` with ``config``'s thresholds: ``CircuitBreaker("cache-service")``.

    ``fail_max`` failures in a row open it; while open, calls raise
    ``pybreaker.CircuitBreakerError`` without running; after
    ``reset_timeout_s`` (on ``clock``) one trial call is let through.
    ``exclude`` lists exceptions that are the caller's fault and never count
    (default: ``ValueError``). The breaker re-raises the original exception of
    the call that trips it (not ``CircuitBreakerError``), so callers can tell
    what failed. State changes go to ``metrics`` and the log.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        metrics: ServingMetrics | None = None,
        clock: Clock = time.monotonic,
        exclude: Iterable[type[BaseException] | Callable[[BaseException], bool]] = (ValueError,),
        listeners: Iterable[pybreaker.CircuitBreakerListener] = (),
    ):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a circuit breaker needs a non-empty `name` but got {name!r}")
        if config is not None and not isinstance(config, BreakerConfig):
            raise ValueError(f"`config` has to be a BreakerConfig but got {type(config).__name__}")
        config = config or BreakerConfig()
        super().__init__(
            fail_max=config.fail_max,
            reset_timeout=config.reset_timeout_s,
            success_threshold=config.success_threshold,
            exclude=list(exclude),
            listeners=[BreakerMetricsListener(metrics), *listeners],
            state_storage=MonotonicClockStorage(clock=clock),
            name=name,
            throw_new_error_on_trip=False,
        )
        if metrics is not None:
            metrics.breaker_state.labels(name).state(pybreaker.STATE_CLOSED)

    def protect(self, func: Callable[..., T]) -> Callable[..., T]:
        """Decorator: each call of ``func`` goes through this breaker (``@breaker.protect``)."""
        if not callable(func):
            raise ValueError(f"`protect` decorates a function but got {type(func).__name__}")
        return self(func)


def create_breaker(name: str, config: BreakerConfig | None = None, **options: Any) -> CircuitBreaker:
    """A ``CircuitBreaker`` named ``name`` with ``config``'s thresholds; ``options`` are its ``metrics``,
    ``clock``, ``exclude`` and ``listeners``."""
    return CircuitBreaker(name, config, **options)


class CircuitGuard:
    """Calls through ``breaker``; a failure or an open circuit returns ``fallback()`` instead, counted.

    Fallbacks are counted under this guard's component, the call's
    ``operation`` and the reason (``error`` or ``breaker_open``). Exceptions
    the breaker excludes (``ValueError`` by default) are the caller's bad
    input: they are counted and re-raised, never swallowed.
    """

    def __init__(self, breaker: pybreaker.CircuitBreaker, component: str, metrics: ServingMetrics | None = None):
        self.breaker = breaker
        self.component = component
        self.metrics = metrics

    @property
    def state(self) -> str:
        return self.breaker.current_state

    def call(
        self, fn: Callable[..., T], *args: Any, fallback: Callable[[], T], operation: str = "call", **kwargs: Any
    ) -> T:
        try:
            return self.breaker.call(fn, *args, **kwargs)
        except pybreaker.CircuitBreakerError:
            self._count_fallback(operation, "breaker_open")
            return fallback()
        except Exception as exc:  # noqa: BLE001 - any failure of a guarded call falls back; see below
            if self.metrics is not None:
                self.metrics.record_error(self.component, exc)
            if not self.breaker.is_system_error(exc):
                raise
            logger.debug("%s: %s failed (%r); falling back", self.component, getattr(fn, "__name__", fn), exc)
            self._count_fallback(operation, "error")
            return fallback()

    def _count_fallback(self, operation: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.record_fallback(self.component, operation, reason)
