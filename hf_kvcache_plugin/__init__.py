"""Quantized KV cache, prefix reuse and serving helpers for Hugging Face ``transformers``."""

from .cache import QuantizedKVCache, QuantizedKVLayer, create_quantized_kv_cache
from .config import (
    BreakerConfig,
    CacheConfig,
    HealthConfig,
    HealthServerConfig,
    LayerOverride,
    PluginConfig,
    RateLimitConfig,
    ServingConfig,
    load_config,
    parse_config,
)
from .quantization import QuantizedTensor, dequantize, quantize
from .snapshot import SnapshotError

__all__ = [
    "BreakerConfig",
    "CacheConfig",
    "HealthConfig",
    "HealthServerConfig",
    "LayerOverride",
    "PluginConfig",
    "RateLimitConfig",
    "ServingConfig",
    "SnapshotError",
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "QuantizedTensor",
    "create_quantized_kv_cache",
    "dequantize",
    "load_config",
    "parse_config",
    "quantize",
]
