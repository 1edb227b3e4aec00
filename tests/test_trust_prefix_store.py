"""Trust boundaries (#14), prefix store: long chains removed without recursion, callbacks outside the lock."""

from __future__ import annotations

import threading

import pytest

from hf_kvcache_plugin import PrefixEntry, PrefixStore, chunk_keys
from hf_kvcache_plugin.reuse.prefix_store import MIB
from hf_kvcache_plugin.resilience import HealthChecker, consistency_check
from hf_kvcache_plugin.resilience.degradation import prefix_store_problems

from .test_prefix_store import CHUNK, ENTRY_BYTES, NS, entry

LONG = 1000  # a 16k-token prompt at chunk 16; deeper than Python's default recursion limit


def long_chain(n: int = LONG) -> list[PrefixEntry]:
    # one entry's tensors shared by every chunk: the store counts bytes per entry, not per storage
    template = entry(b"t" * 32)
    keys = chunk_keys(NS, list(range(n * CHUNK)), CHUNK)
    return [PrefixEntry(k, keys[i - 1] if i else None, CHUNK, template.keys, template.values) for i, k in enumerate(keys)]


def ready(store: PrefixStore) -> str:
    health = HealthChecker()
    health.register("prefix store", consistency_check(lambda: prefix_store_problems(store), "prefix store"))
    return health.readiness().status.value


@pytest.mark.parametrize("how", ["clear", "remove", "resize"])
def test_a_1000_chunk_chain_leaves_whole_with_exact_bytes_and_readiness_ok(how):
    evicted = []
    store = PrefixStore(max_size_mb=(LONG + 1) * ENTRY_BYTES / MIB, chunk_size=CHUNK,
                        on_evict=lambda e, why: evicted.append((e.key, why)))  # fmt: skip
    entries = long_chain()
    assert store.put_chain(entries) == LONG and store.used_bytes == LONG * ENTRY_BYTES
    if how == "clear":
        assert store.clear() == LONG
    elif how == "remove":
        assert store.remove([entries[0].key]) == LONG * ENTRY_BYTES
    else:
        store.resize(0)
    assert len(store) == 0 and store.used_bytes == 0 and store.accounting_problems() == []
    stats = store.stats()
    assert stats["evictions"] == LONG and stats["evicted_bytes"] == LONG * ENTRY_BYTES
    # every chunk heard once, the leaf first: nothing ever outlives the chunk it extends
    assert [k for k, _ in evicted] == [e.key for e in reversed(entries)]
    assert ready(store) == "healthy"


def test_removing_the_middle_of_a_long_chain_keeps_the_head_exactly():
    store = PrefixStore(max_size_mb=(LONG + 1) * ENTRY_BYTES / MIB, chunk_size=CHUNK)
    entries = long_chain()
    store.put_chain(entries)
    assert store.remove([entries[400].key], reason="coordinator") == 600 * ENTRY_BYTES
    assert len(store) == 400 and store.used_bytes == 400 * ENTRY_BYTES and store.accounting_problems() == []
    assert store.lookup(NS, list(range(LONG * CHUNK))).num_tokens == 400 * CHUNK
    assert ready(store) == "healthy"


def test_clear_spares_a_pinned_chain_and_what_it_extends():
    store = PrefixStore(max_size_mb=(LONG + 1) * ENTRY_BYTES / MIB, chunk_size=CHUNK)
    entries = long_chain()
    store.put_chain(entries)
    store.pin([entries[499].key])
    assert store.clear() == 500  # chunks 500.. are cut off; 0..499 carry the pin
    assert len(store) == 500 and store.used_bytes == 500 * ENTRY_BYTES and store.accounting_problems() == []


@pytest.mark.parametrize("how", ["put_chain", "remove", "clear", "resize", "unpin"])
def test_on_evict_runs_after_the_store_lock_is_released(how):
    held_during_callback = []

    def on_evict(e, why):
        # another thread tries the lock: it gets it only if this callback does not run under it
        got = []

        def try_lock():
            got.append(store._lock.acquire(blocking=False))
            if got[0]:
                store._lock.release()

        probe = threading.Thread(target=try_lock)
        probe.start()
        probe.join()
        held_during_callback.append(not got[0])
        store.stats()  # and a callback may use the store

    store = PrefixStore(max_size_mb=2 * ENTRY_BYTES / MIB, chunk_size=CHUNK, on_evict=on_evict)
    first = entry(b"a" * 32)
    store.put(first)
    if how == "put_chain":
        store.put_chain([entry(b"b" * 32, seed=1), entry(b"c" * 32, seed=2)])  # the budget evicts `first`
    elif how == "remove":
        store.remove([first.key])
    elif how == "clear":
        store.clear()
    elif how == "resize":
        store.resize(0)
    else:
        store.pin([first.key])
        store.resize(0)  # pinned: stays until unpinned
        assert held_during_callback == []
        store.unpin([first.key])
    assert held_during_callback and not any(held_during_callback)
