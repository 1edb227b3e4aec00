"""Quantized KV cache, prefix reuse and serving helpers for Hugging Face ``transformers``.

The cache and prefix-reuse API is imported here; the resilience, distributed
and app layers load on first use of one of their names (PEP 562), so
``import hf_kvcache_plugin`` pulls in neither ``prometheus_client``,
``pybreaker`` nor the coordinator's ``torch.distributed`` store.

The class names of the specification (``../shared/SPECIFICATION.md``) are
here too, each a class of ours or a documented alias of one:
``Int8Quantizer``, ``Int4Quantizer``, ``MixedPrecisionQuantizer``
(``quantizers``), ``QuantizedKVCacheManager`` (= ``QuantizedKVCache``),
``WorkloadAnalyzer`` (``reuse.workload``), ``AdaptiveCacheSizer``
(= ``AdaptiveSizer``), ``ConsistentHash`` (= ``ConsistentHashRing``),
``CircuitBreaker`` (``pybreaker``), ``MetricsCollector`` (=
``ServingMetrics``, ``prometheus_client``) and ``ProductionCacheWrapper``
(= ``GuardedStore``).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .attention import QUANTIZED_ATTENTION, enable_quantized_attention, register_quantized_attention
from .budget import CacheBudgetExceeded
from .errors import KVCacheError
from .cache import QuantizedKVCache, QuantizedKVCacheManager, create_quantized_kv_cache
from .static_cache import StaticQuantizedKVCache
from .encoder_decoder import quantized_encoder_decoder_cache
from .cache_io import SnapshotError
from .config import (
    BreakerConfig,
    CacheConfig,
    ConfigError,
    DistributedConfig,
    HealthConfig,
    HealthServerConfig,
    LayerOverride,
    PluginConfig,
    PrefixStoreConfig,
    RateLimitConfig,
    ServingConfig,
    SizerConfig,
    load_config,
    parse_config,
)
from .layer import LayerSettings, QuantizedKVLayer
from .quantization import QuantizedTensor, dequantize, quantize
from .quantizers import GroupQuantizer, Int4Quantizer, Int8Quantizer, MixedPrecisionQuantizer, MixedQuantized
from .reuse import (
    AdaptiveCacheSizer,
    AdaptiveSizer,
    MemoryMonitor,
    MemoryPressure,
    MemoryReading,
    PrefixCacheHook,
    PrefixEntry,
    PrefixEntryInfo,
    PrefixMatch,
    PrefixStore,
    RequestRecord,
    SizerDecision,
    WorkloadAnalyzer,
    attach_prefix_cache,
    chunk_keys,
    create_adaptive_sizer,
    model_fingerprint,
    prefix_namespace,
)

# name -> the module that defines it, imported on first access
_LAZY = {
    **dict.fromkeys(
        (
            "CacheCoordinator", "ConsistentHash", "ConsistentHashRing", "EvictionReport", "NodeInfo", "NodeState",
            "PrefixStoreAdapter", "attach_coordinator", "create_distributed_cache_optimizer",
        ),
        ".distributed",
    ),
    **dict.fromkeys(
        (
            "CheckResult", "CircuitBreaker", "CircuitGuard", "GuardedStore", "HealthChecker", "HealthReport",
            "HealthServer", "HealthStatus", "MemoryPressureProbe", "MetricsCollector", "ProductionCacheWrapper",
            "RateLimitExceeded", "RateLimiter", "ServingEndpoint", "ServingMetrics", "StoreMiss", "create_breaker",
            "harden_cache",
        ),
        ".resilience",
    ),
    **dict.fromkeys(("ServingService", "build_service"), ".app"),
    **dict.fromkeys(("RECIPE_DIR", "write_custom_generate"), ".generate_recipe"),
}  # fmt: skip

if TYPE_CHECKING:
    from .app import ServingService, build_service
    from .generate_recipe import RECIPE_DIR, write_custom_generate
    from .distributed import (
        CacheCoordinator,
        ConsistentHash,
        ConsistentHashRing,
        EvictionReport,
        NodeInfo,
        NodeState,
        PrefixStoreAdapter,
        attach_coordinator,
        create_distributed_cache_optimizer,
    )
    from .resilience import (
        CheckResult,
        CircuitBreaker,
        CircuitGuard,
        GuardedStore,
        HealthChecker,
        HealthReport,
        HealthServer,
        HealthStatus,
        MemoryPressureProbe,
        MetricsCollector,
        ProductionCacheWrapper,
        RateLimiter,
        RateLimitExceeded,
        ServingEndpoint,
        ServingMetrics,
        StoreMiss,
        create_breaker,
        harden_cache,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AdaptiveCacheSizer",
    "AdaptiveSizer",
    "BreakerConfig",
    "CacheBudgetExceeded",
    "KVCacheError",
    "CacheConfig",
    "CacheCoordinator",
    "CheckResult",
    "CircuitBreaker",
    "CircuitGuard",
    "ConfigError",
    "ConsistentHash",
    "ConsistentHashRing",
    "DistributedConfig",
    "EvictionReport",
    "GroupQuantizer",
    "GuardedStore",
    "HealthChecker",
    "HealthConfig",
    "HealthReport",
    "HealthServer",
    "HealthServerConfig",
    "HealthStatus",
    "Int4Quantizer",
    "Int8Quantizer",
    "LayerOverride",
    "LayerSettings",
    "MemoryMonitor",
    "MemoryPressure",
    "MemoryPressureProbe",
    "MemoryReading",
    "MetricsCollector",
    "MixedPrecisionQuantizer",
    "MixedQuantized",
    "NodeInfo",
    "NodeState",
    "PluginConfig",
    "PrefixCacheHook",
    "PrefixEntry",
    "PrefixEntryInfo",
    "PrefixMatch",
    "PrefixStore",
    "PrefixStoreAdapter",
    "PrefixStoreConfig",
    "ProductionCacheWrapper",
    "QUANTIZED_ATTENTION",
    "QuantizedKVCache",
    "StaticQuantizedKVCache",
    "QuantizedKVCacheManager",
    "QuantizedKVLayer",
    "QuantizedTensor",
    "RECIPE_DIR",
    "RateLimitConfig",
    "RateLimitExceeded",
    "RateLimiter",
    "RequestRecord",
    "ServingConfig",
    "ServingEndpoint",
    "ServingMetrics",
    "ServingService",
    "SizerConfig",
    "SizerDecision",
    "SnapshotError",
    "StoreMiss",
    "WorkloadAnalyzer",
    "attach_coordinator",
    "attach_prefix_cache",
    "build_service",
    "chunk_keys",
    "create_adaptive_sizer",
    "create_breaker",
    "create_distributed_cache_optimizer",
    "create_quantized_kv_cache",
    "dequantize",
    "enable_quantized_attention",
    "harden_cache",
    "load_config",
    "model_fingerprint",
    "parse_config",
    "prefix_namespace",
    "quantize",
    "quantized_encoder_decoder_cache",
    "register_quantized_attention",
    "write_custom_generate",
]
