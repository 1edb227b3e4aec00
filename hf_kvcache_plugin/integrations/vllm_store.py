"""The prefix store shared by vLLM's scheduler and worker sides of one engine.

vLLM builds a connector twice: on the scheduler side (which asks how many
prompt tokens are stored) and on the worker side (which saves and loads the
KV). By default the two live in different processes. The worker side hosts the
one ``PrefixStore`` (saves and loads touch its bytes in-process, so the byte
budget is enforced in one place) and serves it on a local Unix socket with
``multiprocessing.managers``; the scheduler side connects as a client. Only
token ids, keys and counts cross the socket, never tensors. When both sides
share a process, the client gets the hosted service directly.

The service is the worker's whole tier: the store, the ``AdaptiveSizer`` that
resizes its budget under memory pressure (as for ``transformers``: a thread,
or stepped by the worker each step), and the ``InstanceCluster`` through
which several vLLM instances share their stores. The scheduler side reports
each request's outcome (tokens the tier gave, time to its first token) for
the sizer's hit and latency figures.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.managers import BaseManager
from typing import Any

from ..reuse.prefix_store import PrefixEntry, PrefixStore
from ..reuse.sizer import AdaptiveSizer
from .vllm_cluster import InstanceCluster
from .vllm_settings import TierSettings

__all__ = ["StoreService", "connect_store", "host_store", "stop_hosting"]

# address -> (the service this process hosts there, its server)
_HOSTED: dict[str, tuple["StoreService", Any]] = {}
_HOSTED_LOCK = threading.Lock()


class StoreService:
    """What the scheduler side may ask of the worker's tier (keys and counts only); see the module docstring."""

    def __init__(self, store: PrefixStore, sizer: AdaptiveSizer | None = None,
                 cluster: InstanceCluster | None = None):
        self.store = store
        self.sizer = sizer
        self.cluster = cluster
        self._requests = {"requests": 0, "tier_hits": 0, "tier_tokens": 0}
        self._lock = threading.Lock()

    @classmethod
    def build(cls, settings: TierSettings, entry_check: Callable[[PrefixEntry], str | None] | None = None
              ) -> "StoreService":
        """The tier of ``settings``: its store, and its sizer (started when ``sizer.background``) and its
        cluster (started) when their sections are there. ``entry_check``: what an entry a peer instance sends
        has to pass (the model's entry layout); needed with ``distributed``."""
        store = PrefixStore.from_config(settings.prefix_store)
        sizer = None if settings.sizer is None else AdaptiveSizer.for_store(store, settings.sizer)
        cluster = None
        if settings.distributed is not None:
            if entry_check is None:
                raise ValueError("an instance that shares its tier needs `entry_check` for its peers' entries")
            cluster = InstanceCluster(
                store, settings.distributed, settings.instance_rank, settings.instances, checks=(entry_check,)
            ).start()
        if sizer is not None and settings.sizer.background:
            sizer.start()
        return cls(store, sizer, cluster)

    def matched_tokens(self, namespace: bytes, token_ids: Sequence[int], max_tokens: int) -> int:
        """Prompt tokens covered by the stored chain of whole chunks (at most ``max_tokens``)."""
        return self.store.lookup(namespace, list(token_ids), max_tokens=max_tokens).num_tokens

    def pin_chain(self, namespace: bytes, token_ids: Sequence[int], max_tokens: int) -> list[bytes]:
        """Pin the stored chain (kept until the worker has loaded it and unpins it); its keys."""
        return self.store.lookup(namespace, list(token_ids), max_tokens=max_tokens, pin=True).hit_keys

    def unpin(self, keys: Sequence[bytes]) -> None:
        self.store.unpin(keys)

    def stats(self) -> dict[str, Any]:
        return self.store.stats()

    def record_request(self, tier_tokens: int, latency_ms: float) -> None:
        """A request's first token came ``latency_ms`` after its lookup; the tier gave it ``tier_tokens``
        tokens (0: a miss). Feeds the sizer's hit and latency figures."""
        with self._lock:
            self._requests["requests"] += 1
            self._requests["tier_hits"] += tier_tokens > 0
            self._requests["tier_tokens"] += tier_tokens
        if self.sizer is not None:
            (self.sizer.record_hit if tier_tokens > 0 else self.sizer.record_miss)(latency_ms)

    def step_sizer_if_due(self) -> None:
        """The worker's per-step call: steps a sizer that runs without its own thread, once per ``interval_s``."""
        if self.sizer is not None and not self.sizer.running:
            self.sizer.step_if_due()

    def tier_stats(self) -> dict[str, Any]:
        """The store's figures, the requests the scheduler reported, and the sizer's and the cluster's (None
        when absent)."""
        with self._lock:
            requests = dict(self._requests)
        return {
            "store": self.store.stats(),
            "requests": requests,
            "sizer": None if self.sizer is None else self.sizer.get_stats(),
            "cluster": None if self.cluster is None else self.cluster.stats(),
        }

    def close(self) -> None:
        """Stop the sizer's thread and leave the cluster."""
        if self.sizer is not None:
            self.sizer.stop()
        if self.cluster is not None:
            self.cluster.close()

    def host_pid(self) -> int:
        """The process that holds the store (vLLM's worker)."""
        return os.getpid()


def host_store(address: str, authkey: bytes, service: StoreService) -> StoreService:
    """Serve ``service`` at ``address`` (a Unix socket path) from a daemon thread of this process."""
    with _HOSTED_LOCK:
        if address in _HOSTED:
            raise RuntimeError(f"a prefix store is already hosted at {address!r} in this process")

        class _Host(BaseManager):
            pass

        _Host.register("service", callable=lambda: service)
        server = _Host(address=address, authkey=authkey).get_server()
        threading.Thread(target=server.serve_forever, name="hf-kvcache-store", daemon=True).start()
        _HOSTED[address] = (service, server)
        return service


def stop_hosting(address: str) -> None:
    """Stop serving at ``address`` (its socket file goes) and close the tier; no-op if this process does not
    host it."""
    with _HOSTED_LOCK:
        hosted = _HOSTED.pop(address, None)
    if hosted is not None:
        hosted[0].close()
        # the accept loop blocks in accept(); closing the listener ends it and removes the socket file
        hosted[1].listener.close()


class _Client(BaseManager):
    pass


_Client.register("service")


def connect_store(address: str, authkey: bytes, timeout_s: float = 60.0) -> Any:
    """The service at ``address``: this process's own object, or a proxy to the hosting process.

    Waits up to ``timeout_s`` for the worker side to start serving.
    """
    if address in _HOSTED:
        return _HOSTED[address][0]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client = _Client(address=address, authkey=authkey)
            client.connect()
            return client.service()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no prefix store is served at {address!r} after {timeout_s:.0f} s: the worker side of the "
                    f"connector hosts it ({exc})"
                ) from None
            time.sleep(0.05)
