"""The prefix store's budget follows memory pressure: ``AdaptiveSizer``.

A ``memory.MemoryMonitor`` reads memory and fits its trend; ``AdaptiveSizer``
turns the pressure level and the hook's hit/latency figures into a budget:

==========  ==================================================================
pressure    decision
==========  ==================================================================
LOW         grow by ``grow_factor`` if growth would turn misses into hits:
            enough requests seen, misses common, store near its budget,
            hits faster than misses, memory not rising fast
MODERATE    hold (the band between growing and shrinking stops thrashing),
            unless the trend says HIGH is coming (below)
HIGH        shrink by ``shrink_factor``
CRITICAL    emergency: straight to ``min_size_mb``, cooldown or not
==========  ==================================================================

Proactive sizing: below HIGH, the memory trend (least squares over the
monitor's window) is projected ``trend_horizon_s`` ahead; when that
projection reaches HIGH, the budget shrinks by ``shrink_factor`` now, before
the pressure arrives (0 turns it off).

Ordinary resizes are at least ``cooldown_s`` apart. The clock and the memory
reader are injectable, so decisions can be tested without sleeping; the
sizer runs as a background thread (``start``/``stop``, or ``with sizer:``) or
is stepped by hand (``step``) or by the hook (``step_if_due``). The hit and
latency figures are kept by a ``workload.WorkloadAnalyzer``.

``AdaptiveCacheSizer`` (the specification's name) is ``AdaptiveSizer``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import SizerConfig
from .memory import MemoryMonitor, MemoryPressure, MemoryReading, pressure_level
from .workload import WorkloadAnalyzer

if TYPE_CHECKING:
    from .prefix_store import PrefixStore

__all__ = ["AdaptiveCacheSizer", "AdaptiveSizer", "SizerDecision", "create_adaptive_sizer"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SizerDecision:
    """What one step decided; ``new_size_mb == old_size_mb`` for a hold."""

    timestamp: float
    pressure: MemoryPressure
    used_fraction: float
    action: str  # "grow" | "shrink" | "proactive_shrink" | "emergency" | "hold"
    reason: str
    old_size_mb: float
    new_size_mb: float


class AdaptiveSizer:
    """Grows and shrinks a budget (the prefix store's) from memory pressure and hit figures.

    Args:
        config: thresholds, factors, bounds, cooldown (``SizerConfig``).
        resize_callback: called with the new size in MiB at every resize.
        monitor: a ``MemoryMonitor`` (default: a real one with ``config.memory_window``).
        clock: seconds, monotonic; used for the cooldown and the step interval.
        usage_bytes: the bytes the budget currently holds, to tell whether
            growing could help (None: assume the store is full).
        workload: where hits, misses and latencies are kept (default: a
            ``WorkloadAnalyzer`` over ``config.request_window`` requests).
    """

    def __init__(
        self,
        config: SizerConfig | None = None,
        resize_callback: Callable[[float], Any] | None = None,
        monitor: MemoryMonitor | None = None,
        clock: Callable[[], float] = time.monotonic,
        usage_bytes: Callable[[], int] | None = None,
        workload: WorkloadAnalyzer | None = None,
    ):
        self.config = config if config is not None else SizerConfig()
        if not isinstance(self.config, SizerConfig):
            raise ValueError(f"`config` has to be a SizerConfig but got {type(self.config).__name__}")
        cfg = self.config
        self.resize_callback = resize_callback
        self.clock = clock
        self.monitor = monitor if monitor is not None else MemoryMonitor(cfg.memory_window, clock)
        self.usage_bytes = usage_bytes
        self.current_size_mb = cfg.initial_size_mb if cfg.initial_size_mb is not None else cfg.min_size_mb
        self.decisions: deque[SizerDecision] = deque(maxlen=1000)
        self.workload = workload if workload is not None else WorkloadAnalyzer(cfg.request_window)
        self._totals = {"resizes": 0, "emergencies": 0}
        self._last_resize: float | None = None
        self._last_step: float | None = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_store(cls, store: PrefixStore, config: SizerConfig | None = None, **kwargs: Any) -> "AdaptiveSizer":
        """A sizer that resizes ``store`` and reads its usage; starts from the store's budget, clipped to the bounds."""
        config = config if config is not None else SizerConfig()
        if config.initial_size_mb is None:
            start = min(max(store.max_size_mb, config.min_size_mb), config.max_size_mb)
            config = dataclasses.replace(config, initial_size_mb=start)
        sizer = cls(config, resize_callback=store.resize, usage_bytes=lambda: store.used_bytes, **kwargs)
        if store.max_size_mb != sizer.current_size_mb:
            store.resize(sizer.current_size_mb)
        return sizer

    # ------------------------------------------------------------------ figures from the hook
    def record_hit(self, latency_ms: float) -> None:
        """A request that reused a stored prefix, and its latency (time to first token)."""
        self.workload.record_hit(latency_ms)

    def record_miss(self, latency_ms: float) -> None:
        """A request that found nothing stored, and its latency."""
        self.workload.record_miss(latency_ms)

    # ------------------------------------------------------------------ decisions
    def pressure_of(self, used_fraction: float) -> MemoryPressure:
        cfg = self.config
        return pressure_level(used_fraction, cfg.moderate_pressure, cfg.high_pressure, cfg.critical_pressure)

    def step(self) -> SizerDecision:
        """Take a memory reading, decide, and resize if the decision says so."""
        with self._lock:
            now = self.clock()
            self._last_step = now
            reading = self.monitor.sample()
            pressure = self.pressure_of(reading.used_fraction)
            old = self.current_size_mb
            action, new, reason = self._decide(now, pressure, reading.used_fraction)
            decision = SizerDecision(now, pressure, reading.used_fraction, action, reason, old, new)
            if new != old:
                self.current_size_mb = new
                self._last_resize = now
                self._totals["resizes"] += 1
                self._totals["emergencies"] += action == "emergency"
                logger.info("prefix store budget %.1f -> %.1f MiB (%s: %s)", old, new, action, reason)
                if self.resize_callback is not None:
                    self.resize_callback(new)
            self.decisions.append(decision)
            return decision

    def _decide(self, now: float, pressure: MemoryPressure, used_fraction: float) -> tuple[str, float, str]:
        cfg, size = self.config, self.current_size_mb
        if pressure is MemoryPressure.CRITICAL:
            if size > cfg.min_size_mb:
                return "emergency", cfg.min_size_mb, "critical memory pressure"
            return "hold", size, "critical memory pressure, already at the minimum"
        if self._last_resize is not None and now - self._last_resize < cfg.cooldown_s:
            return "hold", size, f"cooldown ({now - self._last_resize:.1f}s of {cfg.cooldown_s}s)"
        if pressure is MemoryPressure.HIGH:
            new = max(cfg.min_size_mb, size * cfg.shrink_factor)
            return ("shrink", new, "high memory pressure") if new < size else ("hold", size, "at the minimum")
        if cfg.trend_horizon_s > 0:
            trend = self.monitor.trend()
            projected = used_fraction + trend * cfg.trend_horizon_s
            if self.pressure_of(min(1.0, projected)) in (MemoryPressure.HIGH, MemoryPressure.CRITICAL):
                new = max(cfg.min_size_mb, size * cfg.shrink_factor)
                reason = (f"memory use rising {trend:.4f}/s, projected to reach {projected:.3f} (high pressure from "
                          f"{cfg.high_pressure}) within {cfg.trend_horizon_s:g} s")
                return ("proactive_shrink", new, reason) if new < size else ("hold", size, "at the minimum; " + reason)
        if pressure is MemoryPressure.MODERATE:
            return "hold", size, "moderate memory pressure"
        why_not = self._why_growth_would_not_help()
        if why_not:
            return "hold", size, why_not
        new = min(cfg.max_size_mb, size * cfg.grow_factor)
        if new <= size:
            return "hold", size, "at the maximum"
        return "grow", new, "low pressure, store full and requests missing"

    def _why_growth_would_not_help(self) -> str | None:
        cfg = self.config
        figures = self.workload.figures()
        if figures["requests"] < cfg.min_requests:
            return f"{figures['requests']} requests seen, growth needs {cfg.min_requests}"
        if figures["miss_rate"] < cfg.grow_min_miss_rate:
            return f"miss rate {figures['miss_rate']:.2f} below {cfg.grow_min_miss_rate}"
        if self.usage_bytes is not None:
            budget = self.current_size_mb * 2**20
            utilization = self.usage_bytes() / budget if budget else 1.0
            if utilization < cfg.grow_min_utilization:
                return f"store uses {utilization:.2f} of its budget; more room would stay empty"
        hit_ms, miss_ms = figures["mean_hit_ms"], figures["mean_miss_ms"]
        if hit_ms is not None and miss_ms is not None and hit_ms >= miss_ms:
            return f"hits ({hit_ms:.1f} ms) are no faster than misses ({miss_ms:.1f} ms)"
        trend = self.monitor.trend()
        if trend > cfg.max_rising_trend:
            return f"memory use rising ({trend:.4f}/s)"
        return None

    # ------------------------------------------------------------------ running
    def step_if_due(self) -> SizerDecision | None:
        """``step`` if ``interval_s`` has passed since the last one (for callers without a thread)."""
        with self._lock:
            due = self._last_step is None or self.clock() - self._last_step >= self.config.interval_s
        return self.step() if due else None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "AdaptiveSizer":
        """Step every ``interval_s`` on a daemon thread until ``stop``."""
        if self.running:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="prefix-store-sizer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            try:
                self.step()
            except Exception:  # a failed reading must not end the thread; the next step retries
                logger.exception("adaptive sizer step failed")

    def __enter__(self) -> "AdaptiveSizer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ reporting
    def get_stats(self) -> dict[str, Any]:
        """Budget, decision and workload figures; ``memory`` describes the latest memory reading.

        ``pressure`` / ``used_fraction`` are those of the last decision (None
        before the first step). ``memory`` is the latest reading, taken now if
        the monitor has none yet: ``pressure_level`` (``low`` .. ``critical``
        against this sizer's thresholds), the used fractions, system and
        process bytes, the accelerator's when there is one, and the trend.
        """
        with self._lock:
            last = self.decisions[-1] if self.decisions else None
            return {
                "current_size_mb": self.current_size_mb,
                "min_size_mb": self.config.min_size_mb,
                "max_size_mb": self.config.max_size_mb,
                **self.workload.totals(),
                **self._totals,
                **self.workload.figures(),
                "pressure": last.pressure.value if last else None,
                "used_fraction": last.used_fraction if last else None,
                "trend_per_s": self.monitor.trend(),
                "last_action": last.action if last else None,
                "last_reason": last.reason if last else None,
                "running": self.running,
                "memory": self._memory_section(),
            }

    def _memory_section(self) -> dict[str, Any]:
        reading: MemoryReading = self.monitor.readings[-1] if self.monitor.readings else self.monitor.sample()
        return {
            "pressure_level": self.pressure_of(reading.used_fraction).value,
            "used_fraction": reading.used_fraction,
            "system_used_fraction": reading.system_used_fraction,
            "system_total_bytes": reading.system_total_bytes,
            "system_available_bytes": reading.system_available_bytes,
            "process_rss_bytes": reading.process_rss_bytes,
            "accelerator_used_fraction": reading.accelerator_used_fraction,
            "accelerator_free_bytes": reading.accelerator_free_bytes,
            "accelerator_total_bytes": reading.accelerator_total_bytes,
            "trend_per_s": self.monitor.trend(),
            "read_at": reading.timestamp,
        }


# The specification's name for the same class.
AdaptiveCacheSizer = AdaptiveSizer


_RUNTIME_OPTIONS = ("monitor", "clock", "usage_bytes", "workload")


def create_adaptive_sizer(
    min_size_mb: float = SizerConfig.min_size_mb,
    max_size_mb: float = SizerConfig.max_size_mb,
    initial_size_mb: float | None = None,
    resize_callback: Callable[[float], Any] | None = None,
    **options: Any,
) -> AdaptiveSizer:
    """An ``AdaptiveSizer`` from keyword settings; ``options`` are other ``SizerConfig`` fields
    or the ``monitor``/``clock``/``usage_bytes``/``workload`` arguments."""
    runtime = {k: options.pop(k) for k in _RUNTIME_OPTIONS if k in options}
    allowed = {f.name for f in dataclasses.fields(SizerConfig)} - {"min_size_mb", "max_size_mb", "initial_size_mb"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown}; allowed are {sorted(allowed | set(_RUNTIME_OPTIONS))}"
        )
    config = SizerConfig(min_size_mb=min_size_mb, max_size_mb=max_size_mb, initial_size_mb=initial_size_mb, **options)
    return AdaptiveSizer(config, resize_callback=resize_callback, **runtime)
