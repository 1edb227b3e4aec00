"""``WorkloadAnalyzer``: hits, misses and their latencies over the recent requests.

The adaptive sizer grows the store only when growth would turn misses into
hits; this is where it reads whether misses are common and hits are faster.
The hook records each request (``record_hit`` / ``record_miss``); totals count
every request, the rates and means only the last ``window``.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any

from ..config import SizerConfig

__all__ = ["WorkloadAnalyzer"]


class WorkloadAnalyzer:
    """Hit/miss counts and latencies; rates and means over the last ``window`` requests (thread-safe)."""

    def __init__(self, window: int = SizerConfig.request_window):
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"`window` has to be a positive integer (requests) but got {window!r}")
        self.window = window
        self._requests: deque[tuple[bool, float]] = deque(maxlen=window)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def record_hit(self, latency_ms: float) -> None:
        """A request that reused a stored prefix, and its latency (time to first token)."""
        self._record(True, latency_ms)

    def record_miss(self, latency_ms: float) -> None:
        """A request that found nothing stored, and its latency."""
        self._record(False, latency_ms)

    def _record(self, hit: bool, latency_ms: float) -> None:
        if (
            not isinstance(latency_ms, (int, float))
            or isinstance(latency_ms, bool)
            or not math.isfinite(latency_ms)
            or latency_ms < 0
        ):
            raise ValueError(f"`latency_ms` has to be a finite number >= 0 but got {latency_ms!r}")
        with self._lock:
            self._requests.append((hit, float(latency_ms)))
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def figures(self) -> dict[str, Any]:
        """Over the window: ``requests``, ``hit_rate``, ``miss_rate``, ``mean_hit_ms``, ``mean_miss_ms``
        (None without such requests)."""
        with self._lock:
            requests = list(self._requests)
        hits = [ms for hit, ms in requests if hit]
        misses = [ms for hit, ms in requests if not hit]
        n = len(requests)
        return {
            "requests": n,
            "hit_rate": len(hits) / n if n else 0.0,
            "miss_rate": len(misses) / n if n else 0.0,
            "mean_hit_ms": sum(hits) / len(hits) if hits else None,
            "mean_miss_ms": sum(misses) / len(misses) if misses else None,
        }

    def totals(self) -> dict[str, int]:
        """Every request recorded: ``hits`` and ``misses``."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses}
