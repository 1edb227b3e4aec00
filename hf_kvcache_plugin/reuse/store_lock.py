"""The prefix store's lock: re-entrant, with callbacks that run once it is released."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["StoreLock"]

logger = logging.getLogger(__name__)


class StoreLock:
    """The store's re-entrant lock; callbacks queued while it is held run once its outermost holder lets go.

    ``on_evict`` runs that way, outside the lock: a callback that takes a lock of its own, or waits for a
    thread that uses the store, cannot deadlock against the store. A callback that raises is logged and the
    others still run (the removal it reports is done).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._pending: list[tuple[Callable[..., Any], tuple]] = []

    def __enter__(self) -> "StoreLock":
        self._lock.acquire()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        pending: list[tuple[Callable[..., Any], tuple]] = []
        if self._depth == 0:
            pending, self._pending = self._pending, []
        self._lock.release()
        for callback, args in pending:
            try:
                callback(*args)
            except Exception:  # noqa: BLE001 - a notification must not undo or interrupt the others
                logger.exception("prefix store: `on_evict` raised")

    def after_release(self, callback: Callable[..., Any], *args: Any) -> None:
        self._pending.append((callback, args))

    def acquire(self, blocking: bool = True) -> bool:
        """The bare lock (no callbacks): for code that only waits for the store, as a probe of it."""
        return self._lock.acquire(blocking)

    def release(self) -> None:
        self._lock.release()
