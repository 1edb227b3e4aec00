"""Encoder-decoder models (T5, BART, Whisper, ...): a ``QuantizedKVCache`` as the self-attention half.

transformers gives these models an ``EncoderDecoderCache(self_attention_cache,
cross_attention_cache)``; ``generate`` builds one only when it makes the cache
itself, so a cache passed by the user has to be one already.
``quantized_encoder_decoder_cache(model.config, "int4")`` is that cache with a
``QuantizedKVCache`` for the decoder's self-attention and, for the
cross-attention, a ``DynamicCache`` (the default: the encoder's K/V are
written once and read every step) or, with ``quantize_cross_attention=True``,
a ``QuantizedKVCache`` that quantizes all of them (no residual window, no
sinks: they never grow). The model reads the cross-attention history through
``layers[i].keys`` / ``.values``, which dequantize on each access: a quantized
cross-attention cache trades one dequantization of the encoder's K/V per layer
and step for its memory.

A bare ``QuantizedKVCache`` handed to such a model is refused at its first
step, with this recipe in the error (``QuantizedKVCache.update``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from .cache import QuantizedKVCache
from .config import CacheConfig

__all__ = ["quantized_encoder_decoder_cache"]


def quantized_encoder_decoder_cache(
    config: PretrainedConfig,
    quant_type: str | None = None,
    *,
    cache_config: CacheConfig | None = None,
    quantize_cross_attention: bool = False,
    **options: Any,
) -> EncoderDecoderCache:
    """``EncoderDecoderCache(QuantizedKVCache(config, ...), cross)`` for ``generate(..., past_key_values=...)``.

    ``quant_type`` / ``cache_config`` / ``options`` are ``QuantizedKVCache``'s;
    the cross-attention cache is a ``DynamicCache`` unless
    ``quantize_cross_attention``, then a ``QuantizedKVCache`` with the same
    settings, ``residual_length=0`` and ``sink_tokens=0``, reading dequantized.
    """
    if not isinstance(config, PretrainedConfig) or not getattr(config, "is_encoder_decoder", False):
        name = type(config).__name__
        raise ValueError(
            f"`quantized_encoder_decoder_cache` needs an encoder-decoder model's config (model.config with "
            f"`is_encoder_decoder=True`) but got {name}; a decoder-only model takes `QuantizedKVCache(model.config)`"
        )
    self_attention = QuantizedKVCache(config, quant_type, cache_config=cache_config, **options)
    if not quantize_cross_attention:
        return EncoderDecoderCache(self_attention, DynamicCache(config=config))
    cross_config = dataclasses.replace(
        self_attention.cache_config, residual_length=0, sink_tokens=0, attention="dequantize"
    )
    return EncoderDecoderCache(self_attention, QuantizedKVCache(config, cache_config=cross_config))
