"""A stored chunk's bytes: a layer's exact K/V quantized with that layer's own codecs.

These are the bytes the layer itself stores when those tokens leave its
residual window as whole blocks (same codec, same block alignment), so a
chunk loaded back (``QuantizedKVLayer.load_blocks``) is never re-quantized.
"""

from __future__ import annotations

import torch

from ..layer import QuantizedKVLayer
from ..quantization import QuantizedTensor

__all__ = ["encode_blocks", "zero_blocks"]


def encode_blocks(
    layer: QuantizedKVLayer, key_states: torch.Tensor, value_states: torch.Tensor
) -> tuple[QuantizedTensor, QuantizedTensor]:
    """Quantize exact K/V [B, H, n*G, D] with ``layer``'s codecs into blocks [B, H, n, G, D].

    Any batch (e.g. one prompt of the cached batch); heads, head_dim and dtype must be the layer's.
    """
    if not layer.is_initialized:
        raise ValueError(f"{layer._name()} has no codecs until it has seen its first tensors")
    layer.check_matches(key_states, value_states, batch=False)
    if key_states.shape[-2] % layer.group_size != 0:
        raise ValueError(
            f"{layer._name()}: `encode_blocks` takes whole blocks of {layer.group_size} tokens but got "
            f"{key_states.shape[-2]} tokens"
        )
    return layer.quantized_keys.codec.encode(key_states), layer.quantized_values.codec.encode(value_states)


def zero_blocks(template: QuantizedTensor, n_blocks: int) -> QuantizedTensor:
    """n blocks shaped like ``template``'s that dequantize to 0 (padding slots, masked anyway)."""
    shape = list(template.shape)
    shape[2] = n_blocks
    return template.map_tensors(
        lambda t: t.new_zeros(t.shape[:2] + (n_blocks,) + t.shape[3:]), new_shape=tuple(shape)
    )
