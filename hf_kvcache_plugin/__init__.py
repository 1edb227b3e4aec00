"""Quantized KV cache, prefix reuse and serving helpers for Hugging Face ``transformers``."""

from .attention import QUANTIZED_ATTENTION, enable_quantized_attention, register_quantized_attention
from .cache import QuantizedKVCache, QuantizedKVLayer, create_quantized_kv_cache
from .config import CacheConfig, LayerOverride, PluginConfig, load_config, parse_config
from .quantization import QuantizedTensor, dequantize, quantize

__all__ = [
    "CacheConfig",
    "LayerOverride",
    "PluginConfig",
    "QUANTIZED_ATTENTION",
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "QuantizedTensor",
    "create_quantized_kv_cache",
    "dequantize",
    "enable_quantized_attention",
    "load_config",
    "parse_config",
    "quantize",
    "register_quantized_attention",
]
