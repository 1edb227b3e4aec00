"""References for the fused attention paths: dequantize-then-SDPA on the same cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_kvcache_plugin.quantization import QuantizedTensor, dequantize


def dequantized_history(layer, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[sinks | blocks | residual] keys and values; dtype None: the cache's own dequantization
    (``layer.dequantized()``, computed in the compute dtype), else every segment dequantized in ``dtype``."""
    if dtype is None:
        return layer.dequantized()
    keys, values = [], []
    for k, v, _ in layer.attention_segments():
        for part, out in ((k, keys), (v, values)):
            dense = dequantize(part, dtype).flatten(2, 3) if isinstance(part, QuantizedTensor) else part.to(dtype)
            out.append(dense)
    return torch.cat(keys, dim=-2), torch.cat(values, dim=-2)


def dequantize_then_sdpa(query, layer, mask, scaling, history_dtype: torch.dtype | None = torch.float32,
                         compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SDPA over the dequantized history, with GQA heads expanded; output in ``compute_dtype``."""
    keys, values = dequantized_history(layer, history_dtype)
    n_rep = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(n_rep, 1), values.repeat_interleave(n_rep, 1)
    return F.scaled_dot_product_attention(
        query.to(compute_dtype), keys.to(compute_dtype), values.to(compute_dtype), attn_mask=mask, scale=scaling
    )


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
