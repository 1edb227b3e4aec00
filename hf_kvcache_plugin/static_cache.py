"""``StaticQuantizedKVCache``: the quantized cache with fixed shapes, which ``generate`` compiles by itself.

``generate`` compiles its decode step (``torch.compile``, Inductor) only for a
cache whose layers are all ``is_compileable`` (``StaticCache``), and only on an
accelerator unless ``compile_config._compile_all_devices`` is set.
``QuantizedKVCache`` is not: its tensors grow, so the compiled step would meet
new shapes and recompile. This cache holds ``StaticQuantizedKVLayer`` s, whose
buffers are allocated once for ``max_cache_len`` tokens, so one graph serves
every decode step:

    cache = StaticQuantizedKVCache(model.config, max_cache_len=prompt_len + new_tokens, quant_type="int4")
    model.generate(**inputs, past_key_values=cache, max_new_tokens=new_tokens)

It quantizes as ``QuantizedKVCache`` does (the same ``CacheConfig``, the same
codes for the same tokens) and reads the blocks fused (``kvquant_sdpa``) on a
model on SDPA. What it does not do: sink tokens, ``mixed`` precision, a byte
budget, sliding-window layers, offloading, snapshots and prefix loads (use
``QuantizedKVCache`` for those); each is refused with an error naming it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, StaticLayer

from .attention.dispatch import QUANTIZED_ATTENTION, prepare_fused_attention, select_fused_attention
from .attention.history import FusedStep, hand_over
from .cache import QuantizedKVCache
from .config import CacheConfig
from .layer import LayerSettings, tracks_grad
from .static_layer import DEFAULT_CROPPABLE_TOKENS, StaticQuantizedKVLayer

__all__ = ["StaticQuantizedKVCache"]

_UNSUPPORTED_OPTIONS = {
    "max_size_mb": "a byte budget (the buffers are allocated whole up front)",
    "sink_tokens": "sink tokens",
}


def _nothing() -> None:
    """A static step has nothing to finish: its blocks were quantized when it was written."""


class StaticQuantizedKVCache(Cache):
    """A quantized KV cache of fixed shapes for ``max_cache_len`` tokens (see the module docstring).

    Args:
        config: the model's ``PretrainedConfig``.
        max_cache_len: tokens the cache can hold (prompt and generated); more is an error.
        quant_type: ``int8 | int4 | int2``; or ``cache_config=CacheConfig(...)``; other ``CacheConfig`` fields as
            keywords (``group_size``, ``residual_length``, ``key_bits``, ``skip_layers``, ...).
        croppable_tokens: exact tokens kept beyond the window so that ``crop`` (assisted decoding) can take them
            back.
    """

    def __init__(
        self,
        config: PretrainedConfig,
        max_cache_len: int,
        quant_type: str | None = None,
        *,
        cache_config: CacheConfig | None = None,
        croppable_tokens: int = DEFAULT_CROPPABLE_TOKENS,
        **options: Any,
    ):
        if not isinstance(config, PretrainedConfig):
            raise ValueError(f"`config` has to be the model's PretrainedConfig but got {type(config).__name__}")
        if cache_config is not None and (quant_type is not None or options):
            raise ValueError("pass either `cache_config` or `quant_type`/options, not both")
        if cache_config is None:
            cache_config = CacheConfig(quant_type=quant_type or CacheConfig.quant_type, **options)
        refused = [what for name, what in _UNSUPPORTED_OPTIONS.items() if getattr(cache_config, name)]
        if cache_config.quant_type == "mixed":
            refused.append("quant_type 'mixed' (blocks re-packed as they age)")
        if refused:
            raise ValueError(f"StaticQuantizedKVCache does not support {', '.join(refused)}; use QuantizedKVCache")
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError("StaticQuantizedKVCache serves decoder-only models; use quantized_encoder_decoder_cache")
        layer_types, _, heads, head_dim = QuantizedKVCache._model_layout(config, None)
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise ValueError(f"StaticQuantizedKVCache quantizes full-attention layers only; this model also has "
                             f"{other} layers: use QuantizedKVCache")
        self.cache_config = cache_config.for_model(len(layer_types), head_dim)
        layers = [
            StaticLayer(max_cache_len) if i in self.cache_config.skip_layers else StaticQuantizedKVLayer(
                LayerSettings.for_layer(self.cache_config, i, heads, head_dim), max_cache_len, croppable_tokens)
            for i in range(len(layer_types))
        ]
        super().__init__(layers=layers)
        self.max_cache_len = max_cache_len
        self._attention_config = config.get_text_config(decoder=True)
        if self.cache_config.attention == "fused":
            if select_fused_attention(self._attention_config) and self.cache_config.cpu_kernel == "auto":
                prepare_fused_attention()

    @property
    def uses_fused_attention(self) -> bool:
        return (self.cache_config.attention == "fused"
                and getattr(self._attention_config, "_attn_implementation", None) == QUANTIZED_ATTENTION)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if (isinstance(layer, StaticQuantizedKVLayer) and layer.holds_tokens and self.uses_fused_attention
                and not tracks_grad(key_states, value_states)):
            # a decode step: attention reads the blocks and the window itself (kvquant_sdpa -> static_attention)
            layer.append(key_states, value_states)
            attention_kwargs = kwargs.get("kwargs")
            attention_kwargs = attention_kwargs if isinstance(attention_kwargs, dict) else None
            step = FusedStep(history=layer, finish=_nothing, cpu_kernel=self.cache_config.cpu_kernel == "auto")
            hand_over(step, attention_kwargs, key_states)
            return key_states, value_states
        return layer.update(key_states, value_states, *args, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (its buffers are allocated whole at the first step)."""
        return sum(layer.nbytes if isinstance(layer, StaticQuantizedKVLayer) else
                   sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
                   for layer in self.layers)

    def get_stats(self) -> dict[str, Any]:
        per_layer = [layer.stats() for layer in self.layers if isinstance(layer, StaticQuantizedKVLayer)]
        return {
            "max_cache_len": self.max_cache_len,
            "seq_length": int(self.get_seq_length()),
            "nbytes": self.nbytes,
            "unquantizable_blocks": sum(s["unquantizable_blocks"] for s in per_layer),
        }
