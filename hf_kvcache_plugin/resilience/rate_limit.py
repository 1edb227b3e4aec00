"""Per-client token buckets for the serving entry points (generate requests, coordinator calls).

Each client key has a bucket of at most ``burst`` tokens that refills at
``rate_per_s``; a request takes one. Over the limit, ``reject`` raises
``RateLimitExceeded`` (with the time until a token is free), ``wait`` sleeps
until the reserved token is due if that is at most ``max_wait_s``. Waiters
reserve their token before sleeping, so concurrent waiters queue in order
instead of stampeding. The clock and the sleep are injectable.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..config import RateLimitConfig
from ..errors import KVCacheError

__all__ = ["RateLimitExceeded", "RateLimiter"]


class RateLimitExceeded(KVCacheError, RuntimeError):
    """A client went over its rate limit; ``retry_after_s`` says when a token is free."""

    code = "rate_limited"
    detail_fields = ("client", "retry_after_s")

    def __init__(self, client: str, retry_after_s: float, rate_per_s: float, burst: int):
        self.client = client
        self.retry_after_s = retry_after_s
        super().__init__(
            f"client {client!r} is over its rate limit of {rate_per_s:g} requests/s (burst {burst}); "
            f"retry in {retry_after_s:.3f} s"
        )


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token bucket per client key; ``acquire(client)`` before serving a request."""

    def __init__(
        self,
        rate_per_s: float = RateLimitConfig.rate_per_s,
        burst: int = RateLimitConfig.burst,
        on_limit: str = RateLimitConfig.on_limit,
        max_wait_s: float = RateLimitConfig.max_wait_s,
        max_clients: int = RateLimitConfig.max_clients,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        # the dataclass is the one place the checks live
        RateLimitConfig(
            rate_per_s=rate_per_s, burst=burst, on_limit=on_limit, max_wait_s=max_wait_s, max_clients=max_clients
        )
        self.rate_per_s, self.burst = float(rate_per_s), int(burst)
        self.on_limit, self.max_wait_s, self.max_clients = on_limit, float(max_wait_s), int(max_clients)
        self._clock, self._sleep = clock, sleep
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: RateLimitConfig, **kwargs) -> "RateLimiter":
        return cls(config.rate_per_s, config.burst, config.on_limit, config.max_wait_s, config.max_clients, **kwargs)

    def acquire(self, client: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens for ``client``; returns the seconds waited (0 when under the limit).

        Raises ``RateLimitExceeded`` when rejecting (``on_limit: reject``, or a
        wait longer than ``max_wait_s``), ``ValueError`` for a bad key or cost.
        """
        if not isinstance(client, str):
            raise ValueError(f"`client` has to be a string key but got {type(client).__name__}: {client!r}")
        if not 0 < cost <= self.burst:
            raise ValueError(f"`cost` has to be in (0, burst={self.burst}] but got {cost}")
        with self._lock:
            now = self._clock()
            bucket = self._bucket(client, now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate_per_s)
            bucket.updated = now
            wait = max(0.0, (cost - bucket.tokens) / self.rate_per_s)
            if wait > 0 and (self.on_limit == "reject" or wait > self.max_wait_s):
                raise RateLimitExceeded(client, wait, self.rate_per_s, self.burst)
            # taken now; below zero it is a reservation the waiter sleeps off
            bucket.tokens -= cost
        if wait > 0:
            self._sleep(wait)
        return wait

    def available(self, client: str) -> float:
        """Tokens ``client`` could take now (``burst`` for an unseen client)."""
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is None:
                return float(self.burst)
            return min(self.burst, bucket.tokens + (self._clock() - bucket.updated) * self.rate_per_s)

    def _bucket(self, client: str, now: float) -> _Bucket:
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
            while len(self._buckets) > self.max_clients:
                # forgetting the least recently seen client gives it a full bucket when it returns
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        return bucket

