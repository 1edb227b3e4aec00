"""Graceful degradation of the store path: ``GuardedStore`` and ``harden_cache``.

A store-like object (``PrefixStore``, or anything with lookup- and insert-like
methods) is wrapped so that a request never fails because the store did:

==========================  ====================================================
event                       what the caller gets
==========================  ====================================================
lookup raises / times out   a miss (``StoreMiss``): the prompt is recomputed
breaker open                a miss at once, without touching the store
insert raises               "nothing stored" (``False`` / ``0``): skipped
memory pressure critical    inserts skipped before reaching the store
entry with NaN/Inf scales   not stored (from that chunk on): it would poison hits
release raises              swallowed: the request has its answer already
``ValueError``              re-raised: bad input is the caller's to fix
==========================  ====================================================

Every event is counted in ``ServingMetrics`` (hits, misses, fallbacks by
operation and reason, errors by exception class, lookup latency). ``release`` bypasses the
breaker (an open circuit must not leak the pins of earlier lookups); other
attributes pass through unguarded. Blocks that cannot be quantized are
handled inside the cache itself (see ``QuantizedKVCache``).

``ProductionCacheWrapper`` (the specification's "all-in-one wrapper") is
``GuardedStore``, what ``harden_cache`` wraps a store in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pybreaker
from transformers.cache_utils import Cache

from ..blocks import unquantizable_blocks
from ..config import BreakerConfig
from ..quantization import QuantizedTensor
from .breakers import CircuitGuard, create_breaker
from .metrics import ServingMetrics

if TYPE_CHECKING:
    from ..reuse.prefix_store import PrefixStore

__all__ = [
    "DEFAULT_INSERT_METHODS",
    "DEFAULT_LOOKUP_METHODS",
    "GuardedStore",
    "ProductionCacheWrapper",
    "StoreMiss",
    "entry_problem",
    "harden_cache",
    "prefix_store_problems",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreMiss:
    """A miss in the shape of ``PrefixStore.lookup``'s ``PrefixMatch``: no entries, no chunk keys.

    Without chunk keys the caller also stores nothing for that request, which
    is what a store that just failed should be asked to do. It is falsy.
    """

    chunk_size: int = 0
    chunk_keys: tuple = ()
    entries: tuple = ()
    hit_keys: tuple = ()
    num_tokens: int = 0
    pinned: bool = False

    def __bool__(self) -> bool:
        return False


def _miss_like(store: Any) -> Callable[..., StoreMiss]:
    return lambda *args, **kwargs: StoreMiss(chunk_size=getattr(store, "chunk_size", 0))


# method name -> value when the call is skipped or fails (a factory of the store for lookups)
DEFAULT_LOOKUP_METHODS: dict[str, Callable[[Any], Callable[..., Any]]] = {
    "lookup": _miss_like,
    "get": lambda store: lambda *args, **kwargs: None,
}
DEFAULT_INSERT_METHODS: dict[str, Any] = {"put": False, "put_chain": 0, "insert": False}
_CHAIN_METHODS = ("put_chain",)  # take a sequence of entries; the others take one
_RELEASE_METHODS = ("release", "unpin")


def entry_problem(entry: Any) -> str | None:
    """Why an entry (``PrefixEntry``-like: ``keys``/``values`` per layer) must not be stored, or None."""
    for stream in ("keys", "values"):
        for layer, blocks in enumerate(getattr(entry, stream, None) or ()):
            if isinstance(blocks, QuantizedTensor) and unquantizable_blocks(blocks):
                return f"layer {layer} {stream} have non-finite scales or zeros (NaN/Inf K/V or scale overflow)"
    return None


def prefix_store_problems(store: "PrefixStore") -> list[str]:
    """Byte accounting and chain links of a ``PrefixStore`` (for ``consistency_check``)."""
    return store.accounting_problems()


def _is_hit(result: Any) -> bool:
    """A ``PrefixMatch`` hits when it covers tokens; anything else when it is truthy."""
    tokens = getattr(result, "num_tokens", None)
    return tokens > 0 if isinstance(tokens, int) else bool(result)


class GuardedStore:
    """``wrapped`` (a store) behind a circuit breaker, with metrics and fallbacks (see the module docstring).

    Args:
        wrapped: a store-like object, ``self.wrapped`` afterwards.
        name: component name in metrics, logs and the breaker.
        breaker: a ``pybreaker.CircuitBreaker``; default one from ``config`` (``create_breaker``).
        metrics: where events are counted; default a fresh ``ServingMetrics``.
        memory_pressure: returns ``low|moderate|high|critical``; at ``critical`` inserts are skipped.
        lookup_methods / insert_methods: which methods are guarded, and what a failed call returns.
        validate_entry: says why an entry must not be stored (default ``entry_problem``), or None.
        clock: seconds, for the lookup latency histogram.
    """

    def __init__(
        self,
        wrapped: Any,
        name: str = "store",
        *,
        breaker: pybreaker.CircuitBreaker | None = None,
        config: BreakerConfig | None = None,
        metrics: ServingMetrics | None = None,
        memory_pressure: Callable[[], str] | None = None,
        lookup_methods: Mapping[str, Callable[[Any], Callable[..., Any]]] = DEFAULT_LOOKUP_METHODS,
        insert_methods: Mapping[str, Any] = DEFAULT_INSERT_METHODS,
        validate_entry: Callable[[Any], str | None] | None = entry_problem,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.wrapped = wrapped
        self.name = name
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self.breaker = breaker if breaker is not None else create_breaker(name, config, metrics=self.metrics)
        self.guard = CircuitGuard(self.breaker, name, self.metrics)
        self.memory_pressure = memory_pressure
        self._misses = {m: make(wrapped) for m, make in lookup_methods.items() if callable(getattr(wrapped, m, None))}
        self._skipped = {m: v for m, v in insert_methods.items() if callable(getattr(wrapped, m, None))}
        if not self._misses or not self._skipped:
            raise ValueError(
                f"`{name}`: a store needs a lookup method (one of {sorted(lookup_methods)}) and an insert method "
                f"(one of {sorted(insert_methods)}); {type(wrapped).__name__} has "
                f"{sorted(self._misses) or 'no lookup'} and {sorted(self._skipped) or 'no insert'}"
            )
        self._releases = tuple(m for m in _RELEASE_METHODS if callable(getattr(wrapped, m, None)))
        self.validate_entry = validate_entry
        self._clock = clock
        if callable(getattr(wrapped, "stats", None)):
            self.metrics.watch_store(wrapped, name)

    def __getattr__(self, attr: str) -> Any:
        # only reached for names not set on the wrapper itself
        if attr in self._misses:
            return lambda *args, **kwargs: self._lookup(attr, args, kwargs)
        if attr in self._skipped:
            return lambda *args, **kwargs: self._insert(attr, args, kwargs)
        if attr in self._releases:
            return lambda *args, **kwargs: self._release(attr, args, kwargs)
        return getattr(self.wrapped, attr)

    def __contains__(self, key: object) -> bool:
        return self.guard.call(self.wrapped.__contains__, key, fallback=lambda: False, operation="contains")

    def __len__(self) -> int:
        return self.guard.call(self.wrapped.__len__, fallback=lambda: 0, operation="len")

    @property
    def state(self) -> str:
        """The breaker's state: ``closed``, ``open`` or ``half-open``."""
        return self.guard.state

    def _lookup(self, method: str, args: tuple, kwargs: dict) -> Any:
        start = self._clock()
        result = self.guard.call(
            getattr(self.wrapped, method), *args, fallback=lambda: self._misses[method](*args, **kwargs),
            operation="lookup", **kwargs,
        )  # fmt: skip
        self.metrics.lookup_seconds.labels(self.name).observe(self._clock() - start)
        (self.metrics.hits if _is_hit(result) else self.metrics.misses).labels(self.name).inc()
        return result

    def _insert(self, method: str, args: tuple, kwargs: dict) -> Any:
        if self.memory_pressure is not None and self.memory_pressure() == "critical":
            logger.debug("%s: memory pressure critical, %s skipped", self.name, method)
            self.metrics.record_fallback(self.name, "insert", "memory_critical")
            return self._skipped[method]
        if self.validate_entry is not None and args:
            args = self._valid_entries(method, args)
            if args is None:
                return self._skipped[method]
        skipped = self._skipped[method]
        call = getattr(self.wrapped, method)
        return self.guard.call(call, *args, fallback=lambda: skipped, operation="insert", **kwargs)

    def _valid_entries(self, method: str, args: tuple) -> tuple | None:
        """``args`` with the chain cut before its first invalid entry (later ones extend it); None: nothing left."""
        entries = list(args[0]) if method in _CHAIN_METHODS else [args[0]]
        for i, entry in enumerate(entries):
            problem = self.validate_entry(entry)
            if problem is not None:
                logger.warning("%s: not storing %d entr(y/ies): %s", self.name, len(entries) - i, problem)
                self.metrics.record_fallback(self.name, "insert", "invalid_entry", len(entries) - i)
                if i == 0:
                    return None
                return (entries[:i], *args[1:])
        return args

    def _release(self, method: str, args: tuple, kwargs: dict) -> None:
        # not through the breaker: an open circuit must not keep earlier lookups' entries pinned
        try:
            getattr(self.wrapped, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the request already has its answer; count and go on
            self.metrics.record_error(self.name, exc)
            logger.warning("%s: %s failed: %r", self.name, method, exc)


# The specification's name for the same class.
ProductionCacheWrapper = GuardedStore


def harden_cache(
    cache_or_store: Any,
    name: str = "store",
    *,
    metrics: ServingMetrics | None = None,
    config: BreakerConfig | None = None,
    breaker: pybreaker.CircuitBreaker | None = None,
    memory_pressure: Callable[[], str] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Any:
    """Production guards for a cache, a store or a prefix hook.

    - a ``QuantizedKVCache`` (a transformers ``Cache`` with ``get_stats``) is returned as is, watched by ``metrics``
      (``hf_kvcache_cache_bytes``, ``hf_kvcache_cache_full_precision_blocks``
      under ``name``); its blocks that cannot be quantized already stay exact.
    - a store-like object comes back as a ``GuardedStore``.
    - a ``PrefixCacheHook`` gets its ``store`` replaced by a ``GuardedStore``
      of it and is returned; its lookups and inserts are then guarded.
    """
    metrics = metrics if metrics is not None else ServingMetrics()
    if isinstance(cache_or_store, Cache) and callable(getattr(cache_or_store, "get_stats", None)):
        metrics.watch_cache(cache_or_store, name)
        return cache_or_store
    if _serves_through_store(cache_or_store):
        hook = cache_or_store
        if not isinstance(hook.store, GuardedStore):
            hook.store = harden_cache(
                hook.store, name, metrics=metrics, config=config, breaker=breaker, memory_pressure=memory_pressure,
                clock=clock,
            )  # fmt: skip
        return hook
    return GuardedStore(
        cache_or_store, name, breaker=breaker, config=config, metrics=metrics, memory_pressure=memory_pressure,
        clock=clock,
    )  # fmt: skip


def _serves_through_store(obj: Any) -> bool:
    """A generation hook (``PrefixCacheHook``): it generates and reads its store through ``.store``, replaceable."""
    return callable(getattr(obj, "generate", None)) and hasattr(obj, "store") and callable(getattr(obj, "detach", None))
