"""GuardedStore / harden_cache: a failing store turns into misses and skipped inserts, never a failed request."""

from __future__ import annotations

import time

import pytest

from hf_kvcache_plugin import BreakerConfig
from hf_kvcache_plugin.resilience import GuardedStore, ServingMetrics, StoreMiss, create_breaker, harden_cache


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Match:
    """The fields of ``PrefixStore.lookup``'s ``PrefixMatch`` the callers read."""

    def __init__(self, entries: list, chunk_size: int):
        self.entries, self.chunk_size, self.pinned = entries, chunk_size, False
        self.chunk_keys = [e[0] for e in entries]

    @property
    def num_tokens(self) -> int:
        return len(self.entries) * self.chunk_size


class DictStore:
    """A store with the prefix store's method names; ``fail_with`` makes every call raise."""

    chunk_size = 4

    def __init__(self):
        self.entries: dict[tuple, str] = {}
        self.fail_with: BaseException | None = None
        self.calls = 0

    def _maybe_fail(self):
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with

    def lookup(self, namespace: bytes, tokens: list[int], *, max_tokens: int | None = None, pin: bool = False):
        self._maybe_fail()
        if not tokens:
            raise ValueError("`token_ids` is empty: nothing to look up")
        key = tuple(tokens[: self.chunk_size])
        return Match([(key, self.entries[key])] if key in self.entries else [], self.chunk_size)

    def put_chain(self, entries: list[tuple[tuple, str]]) -> int:
        self._maybe_fail()
        self.entries.update(entries)
        return len(entries)

    def release(self, match) -> None:
        pass

    def __contains__(self, key) -> bool:
        self._maybe_fail()
        return key in self.entries

    def stats(self) -> dict:
        return {"used_bytes": 10 * len(self.entries), "max_bytes": 1000, "entries": len(self.entries), "evictions": 0}


def guarded(store=None, **options) -> tuple[GuardedStore, DictStore, ServingMetrics, FakeClock]:
    store, metrics, clock = store or DictStore(), ServingMetrics(), FakeClock()
    breaker_config = options.pop("config", BreakerConfig(fail_max=2, reset_timeout_s=10))
    breaker = create_breaker("prefix", breaker_config, metrics=metrics, clock=clock)
    return GuardedStore(store, "prefix", breaker=breaker, metrics=metrics, **options), store, metrics, clock


def count(metrics: ServingMetrics, name: str, **labels) -> float:
    return metrics.value(name, **labels) or 0.0


@pytest.fixture(autouse=True)
def no_sleeping(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail(f"slept {s} s"))


def test_healthy_store_passes_through_and_counts_hits_and_misses():
    g, store, metrics, _ = guarded()
    assert g.put_chain([((1, 2, 3, 4), "kv")]) == 1
    assert g.lookup(b"ns", [1, 2, 3, 4, 5]).num_tokens == 4
    assert g.lookup(b"ns", [9, 9, 9, 9]).num_tokens == 0
    assert (1, 2, 3, 4) in g and len(store.entries) == 1
    assert g.chunk_size == 4  # other attributes pass through
    assert count(metrics, "hf_kvcache_hits_total", component="prefix") == 1
    assert count(metrics, "hf_kvcache_misses_total", component="prefix") == 1
    assert count(metrics, "hf_kvcache_lookup_duration_seconds_count", component="prefix") == 2
    assert count(metrics, "hf_kvcache_store_entries", component="prefix") == 1


def test_failing_store_gives_misses_and_skipped_inserts_then_the_breaker_stops_calling_it():
    g, store, metrics, clock = guarded()
    store.fail_with = ConnectionError("store node gone")
    miss = g.lookup(b"ns", [1, 2, 3, 4])
    assert isinstance(miss, StoreMiss) and not miss and miss.num_tokens == 0 and miss.chunk_size == 4
    assert miss.chunk_keys == () and miss.entries == ()  # the caller stores nothing for this request
    assert g.put_chain([((5, 6, 7, 8), "kv")]) == 0  # trips the breaker (fail_max 2)
    assert g.state == "open"
    calls = store.calls
    assert g.lookup(b"ns", [1, 2, 3, 4]).num_tokens == 0
    assert g.put_chain([((5, 6, 7, 8), "kv")]) == 0
    assert (1, 2, 3, 4) not in g
    assert store.calls == calls  # open: the store is not touched

    store.fail_with = None
    clock.now += 10
    assert g.put_chain([((5, 6, 7, 8), "kv")]) == 1  # trial call succeeds, breaker closes
    assert g.state == "closed"
    assert g.lookup(b"ns", [5, 6, 7, 8]).num_tokens == 4

    def fallbacks(operation, reason):
        return count(metrics, "hf_kvcache_fallbacks_total", component="prefix", operation=operation, reason=reason)

    assert fallbacks("lookup", "error") == 1 and fallbacks("insert", "error") == 1
    assert fallbacks("lookup", "breaker_open") == 1 and fallbacks("insert", "breaker_open") == 1
    assert fallbacks("contains", "breaker_open") == 1
    assert count(metrics, "hf_kvcache_errors_total", component="prefix", kind="ConnectionError") == 2
    assert count(metrics, "hf_kvcache_breaker_opens_total", breaker="prefix") == 1
    assert count(metrics, "hf_kvcache_breaker_recoveries_total", breaker="prefix") == 1
    assert count(metrics, "hf_kvcache_misses_total", component="prefix") == 2


def test_timeouts_count_by_kind():
    g, store, metrics, _ = guarded(config=BreakerConfig(fail_max=5))
    store.fail_with = TimeoutError("peer did not answer in 0.5 s")
    assert g.lookup(b"ns", [1, 2, 3, 4]).num_tokens == 0
    assert count(metrics, "hf_kvcache_errors_total", component="prefix", kind="TimeoutError") == 1


def test_bad_input_is_raised_not_swallowed_and_does_not_trip_the_breaker():
    g, store, metrics, _ = guarded(config=BreakerConfig(fail_max=1))
    for _ in range(3):
        with pytest.raises(ValueError, match="`token_ids` is empty"):
            g.lookup(b"ns", [])
    assert g.state == "closed"
    assert count(metrics, "hf_kvcache_errors_total", component="prefix", kind="ValueError") == 3
    assert count(metrics, "hf_kvcache_fallbacks_total", component="prefix", operation="lookup", reason="error") == 0


def test_critical_memory_skips_inserts_before_they_reach_the_store():
    level = {"now": "low"}
    g, store, metrics, _ = guarded(memory_pressure=lambda: level["now"])
    assert g.put_chain([((1, 1, 1, 1), "a")]) == 1
    level["now"] = "critical"
    calls = store.calls
    assert g.put_chain([((2, 2, 2, 2), "b")]) == 0
    assert store.calls == calls and (2, 2, 2, 2) not in store.entries
    assert g.lookup(b"ns", [1, 1, 1, 1]).num_tokens == 4  # lookups still served
    labels = {"component": "prefix", "operation": "insert", "reason": "memory_critical"}
    assert count(metrics, "hf_kvcache_fallbacks_total", **labels) == 1


def test_harden_cache_dispatches_and_refuses_what_is_not_a_store():
    metrics = ServingMetrics()
    g = harden_cache(DictStore(), "prefix", metrics=metrics, config=BreakerConfig(fail_max=3))
    assert isinstance(g, GuardedStore) and g.breaker.fail_max == 3
    with pytest.raises(ValueError, match=r"`x`: a store needs a lookup method .*; object has no lookup and no insert"):
        harden_cache(object(), "x")

    class LookupOnly:
        def lookup(self):
            return None

    with pytest.raises(ValueError, match=r"has \['lookup'\] and no insert"):
        harden_cache(LookupOnly(), "x")


def test_every_call_failing_never_raises_from_the_guard():
    g, store, _, _ = guarded()
    for exc in (RuntimeError("boom"), OSError("disk"), KeyError("slot"), MemoryError()):
        store.fail_with = exc
        assert g.lookup(b"ns", [1, 2, 3, 4]).num_tokens == 0
        assert g.put_chain([((1, 2, 3, 4), "kv")]) == 0


def test_release_bypasses_an_open_breaker_and_never_raises():
    g, store, metrics, _ = guarded()
    store.fail_with = ConnectionError("down")
    g.lookup(b"ns", [1, 2, 3, 4])
    g.lookup(b"ns", [1, 2, 3, 4])
    assert g.state == "open"
    released = []
    store.release = released.append
    g.release("match-1")  # an open circuit must not keep earlier lookups' entries pinned
    assert released == ["match-1"]

    def broken(match):
        raise OSError("store process gone")

    store.release = broken
    g.release("match-2")
    assert count(metrics, "hf_kvcache_errors_total", component="prefix", kind="OSError") == 1
