"""Token buckets per client on an injected clock; waiting through an injected sleep."""

from __future__ import annotations

import pytest

from hf_kvcache_plugin import RateLimitConfig
from hf_kvcache_plugin.resilience import RateLimiter, RateLimitExceeded


class FakeTime:
    """A clock whose sleep advances it."""

    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def limiter(t: FakeTime, **options) -> RateLimiter:
    return RateLimiter(clock=t.clock, sleep=t.sleep, **{"rate_per_s": 2.0, "burst": 3, **options})


def test_burst_then_reject_with_a_clear_message_and_retry_time():
    t = FakeTime()
    rl = limiter(t)
    for _ in range(3):
        assert rl.acquire("alice") == 0.0
    with pytest.raises(RateLimitExceeded) as info:
        rl.acquire("alice")
    assert info.value.retry_after_s == pytest.approx(0.5)
    assert str(info.value) == "client 'alice' is over its rate limit of 2 requests/s (burst 3); retry in 0.500 s"
    assert t.slept == []


def test_tokens_refill_at_the_rate_up_to_the_burst():
    t = FakeTime()
    rl = limiter(t)
    for _ in range(3):
        rl.acquire("a")
    t.now += 0.5
    rl.acquire("a")  # one token back after 0.5 s at 2/s
    with pytest.raises(RateLimitExceeded):
        rl.acquire("a")
    t.now += 100
    assert rl.available("a") == 3  # capped at the burst


def test_clients_are_independent():
    t = FakeTime()
    rl = limiter(t, burst=1)
    rl.acquire("a")
    rl.acquire("b")
    with pytest.raises(RateLimitExceeded, match="'a'"):
        rl.acquire("a")


def test_wait_mode_sleeps_for_the_reserved_token_and_queues_waiters():
    t = FakeTime()
    rl = limiter(t, burst=1, on_limit="wait", max_wait_s=1.0)
    assert rl.acquire("a") == 0.0
    assert rl.acquire("a") == pytest.approx(0.5)
    assert t.slept == [pytest.approx(0.5)] and t.now == pytest.approx(0.5)


def test_wait_mode_rejects_waits_longer_than_max_wait():
    t = FakeTime()
    rl = limiter(t, burst=1, rate_per_s=1.0, on_limit="wait", max_wait_s=0.25)
    rl.acquire("a")
    with pytest.raises(RateLimitExceeded, match="retry in 1.000 s"):
        rl.acquire("a")
    assert t.slept == []


def test_reservations_make_concurrent_waiters_queue():
    t = FakeTime()
    # a sleep that does not advance the clock: as if two threads both decided to wait at t=0
    rl = RateLimiter(rate_per_s=1.0, burst=1, on_limit="wait", max_wait_s=5, clock=t.clock, sleep=lambda s: None)
    assert rl.acquire("a") == 0.0
    assert rl.acquire("a") == pytest.approx(1.0)
    assert rl.acquire("a") == pytest.approx(2.0)  # behind the first waiter, not beside it


def test_bucket_memory_is_bounded_by_max_clients():
    t = FakeTime()
    rl = limiter(t, burst=1, max_clients=2)
    rl.acquire("a")
    rl.acquire("b")
    rl.acquire("c")  # forgets "a", the least recently seen
    assert len(rl._buckets) == 2
    assert rl.acquire("a") == 0.0


def test_from_config_and_bad_arguments():
    rl = RateLimiter.from_config(RateLimitConfig(rate_per_s=5, burst=2, on_limit="wait"))
    assert (rl.rate_per_s, rl.burst, rl.on_limit) == (5.0, 2, "wait")
    with pytest.raises(ValueError, match="`burst` has to be a positive integer but got 0"):
        RateLimiter(burst=0)
    with pytest.raises(ValueError, match="`on_limit` has to be one of"):
        RateLimiter(on_limit="drop")
    with pytest.raises(ValueError, match="`client` has to be a string key but got int"):
        rl.acquire(5)
    with pytest.raises(ValueError, match=r"`cost` has to be in \(0, burst=2\] but got 3"):
        rl.acquire("a", cost=3)
