"""The hook's request totals are updated under its lock (issue 14: "request totals updated without a lock").

A race on ``+=`` is rare and timing-dependent, so the test does not try to
provoke one: it watches the lock instead. The hook's lock is replaced by one
that knows which thread holds it, and its totals by a dict that records every
write made without that lock held by the writing thread. Requests come from
several threads at once, as from a threaded server; every write must be
under the lock, and the totals must add up to the requests made.
"""

from __future__ import annotations

import threading

import torch

from hf_kvcache_plugin import CacheConfig, PrefixStore, attach_prefix_cache

THREADS = 4
REQUESTS_PER_THREAD = 3


class OwnedLock:
    """A ``threading.Lock`` that knows its holder."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    def acquire(self, *args, **kwargs) -> bool:
        got = self._lock.acquire(*args, **kwargs)
        if got:
            self.owner = threading.get_ident()
        return got

    def release(self) -> None:
        self.owner = None
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    def held_here(self) -> bool:
        return self.owner == threading.get_ident()


class WatchedTotals(dict):
    """The hook's totals; notes each write made while ``lock`` is not held by the writer."""

    def __init__(self, initial: dict, lock: OwnedLock):
        super().__init__(initial)
        self.lock = lock
        self.unlocked_writes: list[str] = []

    def __setitem__(self, key, value) -> None:
        if not self.lock.held_here():
            self.unlocked_writes.append(key)
        super().__setitem__(key, value)


def test_totals_are_only_written_under_the_lock_and_add_up(model):
    store = PrefixStore(max_size_mb=8, chunk_size=16)
    hook = attach_prefix_cache(model, store, CacheConfig(quant_type="int8", group_size=8, residual_length=16))
    try:
        lock = OwnedLock()
        hook._totals_lock = lock
        hook._totals = totals = WatchedTotals(hook._totals, lock)
        shared = torch.randint(3, 500, (32,), generator=torch.Generator().manual_seed(0))
        errors: list[BaseException] = []

        def client(seed: int) -> None:
            own = torch.Generator().manual_seed(seed)
            try:
                for _ in range(REQUESTS_PER_THREAD):
                    ids = torch.cat([shared, torch.randint(3, 500, (5,), generator=own)]).unsqueeze(0)
                    model.generate(ids, max_new_tokens=2, do_sample=False)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread's assert
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert totals.unlocked_writes == []
        stats = hook.stats()
        assert stats["requests"] == THREADS * REQUESTS_PER_THREAD
        assert stats["prompt_tokens"] == THREADS * REQUESTS_PER_THREAD * 37
        assert stats["hit_requests"] == sum(r.hit_tokens > 0 for r in hook.records)
    finally:
        hook.detach()
