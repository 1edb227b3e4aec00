"""``ServingMetrics``: the Prometheus metrics of one serving process, on a registry of its own.

Every instance owns a fresh ``CollectorRegistry`` (never the global one), so
two caches, two tests or two endpoints in one process never collide. Values
owned by another object (a store's bytes and evictions, a cache's bytes) are
read at scrape time through collectors holding weak references, so they are
never counted twice and a dropped object stops being reported.

Names follow the Prometheus conventions: ``hf_kvcache_`` prefix, base units
(``_seconds``, ``_bytes``, ``_ratio``), ``_total`` for counters. Callers add
metrics of their own to the same registry with ``counter``, ``gauge`` and
``histogram`` (exposed with the rest on ``/metrics``).

``MetricsCollector`` (the specification's name) is ``ServingMetrics``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..reuse.memory import MemoryPressure

__all__ = ["PRESSURE_LEVELS", "MetricsCollector", "ServingMetrics"]

logger = logging.getLogger(__name__)

PRESSURE_LEVELS = tuple(level.value for level in MemoryPressure)  # the gauge reports the index
BREAKER_STATES = ("closed", "open", "half-open")  # pybreaker's state names
_LOOKUP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_PREFILL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_DECODE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# store.stats() key -> (metric name, help, kind); keys a store lacks are skipped
_STORE_STATS = {
    "used_bytes": ("hf_kvcache_store_bytes", "Tensor bytes held by the prefix store", "gauge"),
    "max_bytes": ("hf_kvcache_store_budget_bytes", "Byte budget of the prefix store", "gauge"),
    "entries": ("hf_kvcache_store_entries", "Entries held by the prefix store", "gauge"),
    "evictions": ("hf_kvcache_evictions", "Entries evicted by the store's policy", "counter"),
}


class ServingMetrics:
    """Counters, gauges and histograms of the serving path; see ``docs/operations.md`` for the list."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hf_kvcache_requests", "Generate requests by entry point and outcome "
            "(served, degraded, rate_limited, invalid, failed)", ["entry_point", "outcome"], registry=r,
        )  # fmt: skip
        self.hits = Counter("hf_kvcache_hits", "Store lookups that found a stored prefix", ["component"], registry=r)
        self.misses = Counter(
            "hf_kvcache_misses", "Store lookups that found nothing (failed lookups included)", ["component"], registry=r
        )
        self.fallbacks = Counter(
            "hf_kvcache_fallbacks", "Calls answered by a fallback instead (a miss, a skipped insert, a recompute), by "
            "component, operation and reason", ["component", "operation", "reason"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "hf_kvcache_errors", "Exceptions met on the serving path by component and exception class",
            ["component", "kind"], registry=r,
        )  # fmt: skip
        self.breaker_opens = Counter(
            "hf_kvcache_breaker_opens", "Times a circuit breaker opened", ["breaker"], registry=r
        )
        self.breaker_recoveries = Counter(
            "hf_kvcache_breaker_recoveries", "Times a circuit breaker closed again after a trial", ["breaker"],
            registry=r,
        )  # fmt: skip
        self.breaker_state = Enum(
            "hf_kvcache_breaker_state", "Circuit breaker state", ["breaker"], states=list(BREAKER_STATES), registry=r
        )
        self.memory_pressure_level = Gauge(
            "hf_kvcache_memory_pressure_level", "Memory pressure: 0 low, 1 moderate, 2 high, 3 critical", registry=r
        )
        self.memory_used_ratio = Gauge("hf_kvcache_memory_used_ratio", "Used fraction of system memory", registry=r)
        self.cache_bytes = Gauge(
            "hf_kvcache_cache_bytes", "Bytes held by a watched KV cache", ["component"], registry=r
        )
        self.cache_full_precision_blocks = Gauge(
            "hf_kvcache_cache_full_precision_blocks", "Blocks a watched KV cache keeps in full precision because "
            "they could not be quantized", ["component"], registry=r,
        )  # fmt: skip
        self.lookup_seconds = Histogram(
            "hf_kvcache_lookup_duration_seconds", "Store lookup latency", ["component"], buckets=_LOOKUP_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.prefill_seconds = Histogram(
            "hf_kvcache_prefill_duration_seconds", "Request start to first new token", ["entry_point"],
            buckets=_PREFILL_BUCKETS, registry=r,
        )  # fmt: skip
        self.decode_token_seconds = Histogram(
            "hf_kvcache_decode_token_duration_seconds", "Time between consecutive new tokens", ["entry_point"],
            buckets=_DECODE_BUCKETS, registry=r,
        )  # fmt: skip
        self._stores = _StoreCollector()
        r.register(self._stores)
        self._own: dict[str, tuple[Counter | Gauge | Histogram, tuple[str, ...]]] = {}
        self._own_lock = threading.Lock()

    # ------------------------------------------------------------------ the caller's own metrics
    def counter(self, name: str, documentation: str = "", labelnames: Sequence[str] = ()) -> Counter:
        """A counter of the caller's on this registry, made on first use and the same one after:
        ``metrics.counter("app_retries").inc()`` (exposed as ``app_retries_total``)."""
        return self._own_metric(Counter, name, documentation, labelnames)

    def gauge(self, name: str, documentation: str = "", labelnames: Sequence[str] = ()) -> Gauge:
        """A gauge of the caller's on this registry (see ``counter``)."""
        return self._own_metric(Gauge, name, documentation, labelnames)

    def histogram(
        self,
        name: str,
        documentation: str = "",
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
    ) -> Histogram:
        """A histogram of the caller's on this registry (see ``counter``)."""
        return self._own_metric(Histogram, name, documentation, labelnames, buckets=tuple(buckets))

    def _own_metric(self, kind: type, name: str, documentation: str, labelnames: Sequence[str], **kwargs: Any) -> Any:
        labelnames = tuple(labelnames)
        with self._own_lock:
            known = self._own.get(name)
            if known is not None:
                metric, labels = known
                if type(metric) is not kind or labels != labelnames:
                    raise ValueError(
                        f"metric {name!r} is a {type(metric).__name__.lower()} with labels {list(labels)}; it cannot "
                        f"be asked for as a {kind.__name__.lower()} with labels {list(labelnames)}"
                    )
                return metric
            metric = kind(name, documentation or name, labelnames, registry=self.registry, **kwargs)
            self._own[name] = (metric, labelnames)
            return metric

    # ------------------------------------------------------------------ recording helpers
    def record_error(self, component: str, exc: BaseException) -> None:
        self.errors.labels(component, type(exc).__name__).inc()

    def record_fallback(self, component: str, operation: str, reason: str, count: float = 1) -> None:
        self.fallbacks.labels(component, operation, reason).inc(count)

    def record_pressure(self, level: str, used_fraction: float) -> None:
        self.memory_pressure_level.set(PRESSURE_LEVELS.index(level))
        self.memory_used_ratio.set(used_fraction)

    # ------------------------------------------------------------------ watched objects
    def watch_cache(self, cache: Any, component: str) -> None:
        """Report ``cache.get_stats()`` bytes and full-precision blocks under ``component`` while it lives."""
        ref = weakref.ref(cache)

        def read(field: str) -> float:
            target = ref()
            return 0.0 if target is None else float(target.get_stats()[field])

        self.cache_bytes.labels(component).set_function(lambda: read("total_bytes"))
        self.cache_full_precision_blocks.labels(component).set_function(lambda: read("fallback_blocks"))

    def watch_store(self, store: Any, component: str) -> None:
        """Report ``store.stats()`` bytes, budget, entries and evictions under ``component`` while it lives."""
        self._stores.add(store, component)

    # ------------------------------------------------------------------ reading
    def value(self, name: str, **labels: str) -> float | None:
        """One sample's value or ``None``, e.g. ``value("hf_kvcache_hits_total", component="store")``."""
        return self.registry.get_sample_value(name, labels)

    def as_dict(self) -> dict[str, float]:
        """Every sample as ``{'name{label="v",...}': value}``: the scrape, for users without a scraper."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def exposition(self) -> bytes:
        """The Prometheus text format of everything in this registry."""
        return generate_latest(self.registry)


class _StoreCollector(Collector):
    """Reads the watched stores' own figures at scrape time (their counters stay the source of truth)."""

    def __init__(self) -> None:
        self._stores: dict[str, weakref.ref] = {}
        self._lock = threading.Lock()

    def add(self, store: Any, component: str) -> None:
        with self._lock:
            self._stores[component] = weakref.ref(store)

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for key, (name, doc, kind) in _STORE_STATS.items():
            cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            families[key] = cls(name, doc, labels=["component"])
        with self._lock:
            stores = list(self._stores.items())
        for component, ref in stores:
            store = ref()
            if store is None:
                with self._lock:
                    self._stores.pop(component, None)
                continue
            try:
                stats = store.stats()
            except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the store does
                logger.warning("store %r: stats() failed during a metrics scrape: %r", component, exc)
                continue
            for key, family in families.items():
                if key in stats:
                    family.add_metric([component], float(stats[key]))
        yield from families.values()


# The specification's name for the same class.
MetricsCollector = ServingMetrics
