"""Quantized KV cache, prefix reuse and serving helpers for Hugging Face ``transformers``."""

from .cache import QuantizedKVCache, QuantizedKVLayer, create_quantized_kv_cache
from .config import CacheConfig, LayerOverride, PluginConfig, PrefixStoreConfig, SizerConfig, load_config, parse_config
from .prefix_store import PrefixEntry, PrefixMatch, PrefixStore, chunk_keys, model_fingerprint, prefix_namespace
from .quantization import QuantizedTensor, dequantize, quantize

__all__ = [
    "CacheConfig",
    "LayerOverride",
    "PluginConfig",
    "PrefixEntry",
    "PrefixMatch",
    "PrefixStore",
    "PrefixStoreConfig",
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "QuantizedTensor",
    "SizerConfig",
    "chunk_keys",
    "create_quantized_kv_cache",
    "dequantize",
    "load_config",
    "model_fingerprint",
    "parse_config",
    "prefix_namespace",
    "quantize",
]
