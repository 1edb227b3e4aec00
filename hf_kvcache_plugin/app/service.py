"""``build_service``: the serving pieces wired from a ``PluginConfig``.

For one model: a ``ServingMetrics`` registry, a ``MemoryPressureProbe``, a
``HealthChecker`` (memory; with a prefix store also its breaker and its
consistency), the cached path (the prefix hook with its store behind a
``GuardedStore`` when ``prefix_store:`` is configured, else ``model.generate``
with a ``QuantizedKVCache``), the plain path to recompute on, an optional
rate limiter, and optionally the HTTP endpoint. The endpoint checks token ids
against the model's vocabulary and marks each request in flight for the
``serving_progress`` liveness check. With a ``distributed:``
section also the ``CacheCoordinator`` of this process (``attach_coordinator``)
on the same metrics: its breakers join the ``breakers`` check, its peers the
``peers`` check, and its ``generate`` gets a rate limiter of its own from
``serving.rate_limit``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..cache import QuantizedKVCache
from ..config import PluginConfig
from .._compat import GENERATE_CACHE_KWARG
from ..reuse.hook import PrefixCacheHook, attach_prefix_cache
from ..reuse.prefix_store import PrefixStore
from ..resilience.breakers import create_breaker
from ..resilience.degradation import GuardedStore, harden_cache, prefix_store_problems
from ..resilience.endpoint import ServingEndpoint
from ..resilience.health import (
    HealthChecker,
    MemoryPressureProbe,
    breaker_check,
    consistency_check,
    peers_check,
    system_memory_used_fraction,
)
from ..resilience.liveness import ProgressWatch
from ..resilience.probe_server import HealthServer
from ..resilience.metrics import ServingMetrics
from ..resilience.rate_limit import RateLimiter

if TYPE_CHECKING:
    import pybreaker

    from ..distributed.coordinator import CacheCoordinator

__all__ = ["ServingService", "build_service"]

STORE_COMPONENT = "prefix_store"
OUTCOMES = ("served", "degraded", "invalid", "rate_limited", "failed")


@dataclass
class ServingService:
    """What ``build_service`` wired; ``close()`` stops the HTTP endpoint and detaches the hook."""

    endpoint: ServingEndpoint
    metrics: ServingMetrics
    checker: HealthChecker
    memory: MemoryPressureProbe
    progress: ProgressWatch | None = None
    hook: PrefixCacheHook | None = None
    server: HealthServer | None = None
    coordinator: "CacheCoordinator | None" = None  # with a `distributed:` section

    @property
    def breakers(self) -> "list[pybreaker.CircuitBreaker]":
        """Every breaker the service wired: the store's and, with a coordinator, its peers' and store's."""
        own = [] if self.hook is None else [self.hook.store.breaker]
        return own + ([] if self.coordinator is None else self.coordinator.breakers)

    @property
    def store(self) -> GuardedStore | None:
        return None if self.hook is None else self.hook.store

    def outcomes(self) -> dict[str, int]:
        """Requests so far by outcome."""
        name = self.endpoint.name
        value = self.metrics.value
        return {o: int(value("hf_kvcache_requests_total", entry_point=name, outcome=o) or 0) for o in OUTCOMES}

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.coordinator is not None:
            self.coordinator.close()
        if self.hook is not None:
            self.hook.detach()

    def __enter__(self) -> "ServingService":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_service(
    model: Any,
    config: PluginConfig | None = None,
    *,
    store: PrefixStore | None = None,
    memory_reader: Callable[[], float] = system_memory_used_fraction,
    breaker_clock: Callable[[], float] = time.monotonic,
    clock: Callable[[], float] = time.perf_counter,
    progress_clock: Callable[[], float] = time.monotonic,
    http: bool | None = None,
    http_host: str | None = None,
    http_port: int | None = None,
    generate_kwargs: dict[str, Any] | None = None,
) -> ServingService:
    """Wire the serving pieces for ``model`` from ``config`` (see the module docstring).

    ``store`` replaces the one ``prefix_store:`` would build; ``http`` (default:
    ``serving.http.enabled``), ``http_host`` and ``http_port`` override the
    ``serving.http`` section. ``generate_kwargs`` go to every ``generate`` the
    coordinator runs. Clocks and the memory reader are injectable.
    """
    config = config if config is not None else PluginConfig()
    serving = config.serving
    metrics = ServingMetrics()
    memory = MemoryPressureProbe(serving.health, memory_reader, metrics)
    checker = HealthChecker()
    checker.register("memory", memory.check)
    progress = ProgressWatch(serving.health.stall_after_s, progress_clock)
    checker.register("serving_progress", progress.check, liveness=True)

    def plain(input_ids: torch.Tensor, **kwargs: Any) -> Any:
        # the class's generate: never the hook installed on this instance
        return type(model).generate(model, input_ids, **kwargs)

    hook = coordinator = None
    if config.prefix_store is not None:
        hook = attach_prefix_cache(model, store, config)
        breaker = create_breaker(STORE_COMPONENT, serving.breaker, metrics=metrics, clock=breaker_clock)
        harden_cache(hook, STORE_COMPONENT, metrics=metrics, breaker=breaker, memory_pressure=memory.level)
        raw_store = hook.store.wrapped
        if config.distributed is not None:
            # imported here: only a `distributed:` section needs torch.distributed's store and the coordinator
            from ..distributed.launch import attach_coordinator

            pad = getattr(model.generation_config, "pad_token_id", None)
            coordinator = attach_coordinator(
                hook, config.distributed, pad_token_id=0 if pad is None else int(pad),
                generate_kwargs=generate_kwargs, metrics=metrics, limiter=_limiter(config),
            )  # fmt: skip
        checker.register("breakers", breaker_check([breaker, *(coordinator.breakers if coordinator else [])]))
        checker.register("prefix_store", consistency_check(lambda: prefix_store_problems(raw_store), "prefix store"))
        if coordinator is not None:
            checker.register("peers", peers_check(coordinator.peers_alive))
        cached = hook.generate
    else:

        def cached(input_ids: torch.Tensor, **kwargs: Any) -> Any:
            cache = QuantizedKVCache.from_config(config, model.config)
            metrics.watch_cache(cache, "request")
            return plain(input_ids, **{GENERATE_CACHE_KWARG: cache}, **kwargs)

    endpoint = ServingEndpoint(
        cached, plain, limiter=_limiter(config), metrics=metrics, clock=clock, vocab_size=_vocab_size(model),
        progress=progress,
    )  # fmt: skip
    server = None
    if http if http is not None else serving.http.enabled:
        host = http_host if http_host is not None else serving.http.host
        port = http_port if http_port is not None else serving.http.port
        server = HealthServer(checker, metrics, host, port).start()
    return ServingService(endpoint, metrics, checker, memory, progress, hook, server, coordinator)


def _vocab_size(model: Any) -> int | None:
    """Rows of the input embedding: the ids a prompt may hold (None: not known, not checked)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    return int(rows) if isinstance(rows, int) else None


def _limiter(config: PluginConfig) -> RateLimiter | None:
    """A fresh limiter (buckets of its own) per entry point, or None when rate limits are off."""
    limits = config.serving.rate_limit
    return RateLimiter.from_config(limits) if limits.enabled else None
