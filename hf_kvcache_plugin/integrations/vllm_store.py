"""The prefix store shared by vLLM's scheduler and worker sides of one engine.

vLLM builds a connector twice: on the scheduler side (which asks how many
prompt tokens are stored) and on the worker side (which saves and loads the
KV). By default the two live in different processes. The worker side hosts the
one ``PrefixStore`` (saves and loads touch its bytes in-process, so the byte
budget is enforced in one place) and serves it on a local Unix socket with
``multiprocessing.managers``; the scheduler side connects as a client. Only
token ids, keys and counts cross the socket, never tensors. When both sides
share a process, the client gets the hosted service directly.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from multiprocessing.managers import BaseManager
from typing import Any

from ..reuse.prefix_store import PrefixStore

__all__ = ["StoreService", "connect_store", "host_store", "stop_hosting"]

# address -> (the service this process hosts there, its server)
_HOSTED: dict[str, tuple["StoreService", Any]] = {}
_HOSTED_LOCK = threading.Lock()


class StoreService:
    """What the scheduler side may ask of the worker's store (keys and counts only)."""

    def __init__(self, store: PrefixStore):
        self.store = store

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

    def host_pid(self) -> int:
        """The process that holds the store (vLLM's worker)."""
        return os.getpid()


def host_store(address: str, authkey: bytes, store: PrefixStore) -> StoreService:
    """Serve ``store`` at ``address`` (a Unix socket path) from a daemon thread of this process."""
    with _HOSTED_LOCK:
        if address in _HOSTED:
            raise RuntimeError(f"a prefix store is already hosted at {address!r} in this process")
        service = StoreService(store)

        class _Host(BaseManager):
            pass

        _Host.register("service", callable=lambda: service)
        server = _Host(address=address, authkey=authkey).get_server()
        threading.Thread(target=server.serve_forever, name="hf-kvcache-store", daemon=True).start()
        _HOSTED[address] = (service, server)
        return service


def stop_hosting(address: str) -> None:
    """Stop serving at ``address`` (its socket file goes); no-op if this process does not host it."""
    with _HOSTED_LOCK:
        hosted = _HOSTED.pop(address, None)
    if hosted is not None:
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
