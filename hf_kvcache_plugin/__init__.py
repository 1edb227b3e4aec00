"""Quantized KV cache, prefix reuse and serving helpers for Hugging Face ``transformers``."""

from .attention import QUANTIZED_ATTENTION, enable_quantized_attention, register_quantized_attention
from .cache import QuantizedKVCache, QuantizedKVLayer, create_quantized_kv_cache
from .config import (
    CacheConfig,
    DistributedConfig,
    LayerOverride,
    PluginConfig,
    PrefixStoreConfig,
    SizerConfig,
    load_config,
    parse_config,
)
from .distributed import (
    CacheCoordinator,
    ConsistentHashRing,
    EvictionReport,
    NodeInfo,
    NodeState,
    PrefixStoreAdapter,
    attach_coordinator,
    create_distributed_cache_optimizer,
)
from .hook import PrefixCacheHook, RequestRecord, attach_prefix_cache
from .prefix_store import PrefixEntry, PrefixMatch, PrefixStore, chunk_keys, model_fingerprint, prefix_namespace
from .quantization import QuantizedTensor, dequantize, quantize
from .sizer import (
    AdaptiveSizer,
    MemoryMonitor,
    MemoryPressure,
    MemoryReading,
    SizerDecision,
    create_adaptive_sizer,
)

__all__ = [
    "AdaptiveSizer",
    "CacheConfig",
    "CacheCoordinator",
    "ConsistentHashRing",
    "DistributedConfig",
    "EvictionReport",
    "LayerOverride",
    "MemoryMonitor",
    "MemoryPressure",
    "MemoryReading",
    "NodeInfo",
    "NodeState",
    "PluginConfig",
    "PrefixCacheHook",
    "PrefixEntry",
    "PrefixMatch",
    "PrefixStore",
    "PrefixStoreAdapter",
    "PrefixStoreConfig",
    "QUANTIZED_ATTENTION",
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "QuantizedTensor",
    "RequestRecord",
    "SizerConfig",
    "SizerDecision",
    "attach_coordinator",
    "attach_prefix_cache",
    "chunk_keys",
    "create_adaptive_sizer",
    "create_distributed_cache_optimizer",
    "create_quantized_kv_cache",
    "dequantize",
    "enable_quantized_attention",
    "load_config",
    "model_fingerprint",
    "parse_config",
    "prefix_namespace",
    "quantize",
    "register_quantized_attention",
]
