"""Liveness from serving progress: a request in flight for longer than ``stall_after_s`` means a stuck loop.

A process that answers HTTP may still be unable to serve: its serving loop
can hang inside a request (a deadlock, a peer that never answers). The
endpoint marks every request's start and end here; ``check`` (registered as
a liveness check by ``build_service``) is UNHEALTHY while the oldest request
in flight has run longer than the limit, so ``/healthz`` answers 503 and an
orchestrator restarts the process. Waiting for the next request is no stall.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..config import HealthConfig
from .health import CheckResult

__all__ = ["ProgressWatch"]


class ProgressWatch:
    """When each request in flight started; ``check`` says whether the oldest has stalled."""

    def __init__(
        self, stall_after_s: float = HealthConfig.stall_after_s, clock: Callable[[], float] = time.monotonic
    ):
        HealthConfig(stall_after_s=stall_after_s)  # the bounds live in the dataclass
        self.stall_after_s = float(stall_after_s)
        self._clock = clock
        self._ids = itertools.count()
        self._started: dict[int, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def request(self) -> Iterator[None]:
        """Mark one request in flight for the duration of the ``with`` block."""
        with self._lock:
            token = next(self._ids)
            self._started[token] = self._clock()
        try:
            yield
        finally:
            with self._lock:
                del self._started[token]

    @property
    def in_flight(self) -> int:
        return len(self._started)

    def check(self) -> CheckResult:
        with self._lock:
            oldest = min(self._started.values(), default=None)
        if oldest is None:
            return CheckResult.healthy("no request in flight")
        running = self._clock() - oldest
        if running > self.stall_after_s:
            return CheckResult.unhealthy(
                f"a request has been in flight for {running:.1f} s (> stall_after_s {self.stall_after_s:g}): "
                "the serving loop looks stuck"
            )
        return CheckResult.healthy(f"{self.in_flight} request(s) in flight, the oldest for {running:.1f} s")
