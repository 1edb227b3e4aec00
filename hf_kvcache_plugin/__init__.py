"""Quantized KV cache, prefix reuse and serving helpers for Hugging Face ``transformers``."""

from .cache import QuantizedKVCache, QuantizedKVLayer, create_quantized_kv_cache
from .config import CacheConfig, LayerOverride, PluginConfig, PrefixStoreConfig, SizerConfig, load_config, parse_config
from .quantization import QuantizedTensor, dequantize, quantize

__all__ = [
    "CacheConfig",
    "LayerOverride",
    "PluginConfig",
    "PrefixStoreConfig",
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "QuantizedTensor",
    "SizerConfig",
    "create_quantized_kv_cache",
    "dequantize",
    "load_config",
    "parse_config",
    "quantize",
]
