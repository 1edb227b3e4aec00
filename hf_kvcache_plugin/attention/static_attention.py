"""Fused attention over a ``StaticQuantizedKVLayer``: every shape fixed by the capacity, none by the position.

The quantized block slots are read whole (the C++ kernel or the PyTorch
reference, as for ``QuantizedKVLayer``); the step's exact window is a dense
matmul. Both land on one score row per query at absolute positions, where

- positions before the boundary take the blocks' scores,
- positions from the boundary to the last token take the window's,
- the rest (slots not yet written, the scratch slot) are masked out,

so the model's mask, made for ``max_cache_len`` positions, applies as it is.
The values follow the same split: the blocks' probabilities are zeroed from
the boundary on before the kernel reads every slot, and the window's are
gathered from the row. Reading the whole capacity costs what ``StaticCache``
pays (it too reads every slot), in packed bytes instead of dense ones.
"""

from __future__ import annotations

import torch

from .cpu_kernel import kernel_key_scores_parts, kernel_value_output_parts
from .masks import keep_mask
from .reference import DEFAULT_CHUNK_TOKENS, quantized_key_scores, quantized_value_output

__all__ = ["static_attention"]


def static_attention(
    query: torch.Tensor, layer, attention_mask: torch.Tensor | None, scaling: float, cpu_kernel: bool = False
) -> torch.Tensor:
    """softmax(q K^T * scaling + mask) V over a static layer's blocks and the window its last step left.

    query: [B, Hq, q, D]; returns [B, Hq, q, Dv] in the query's dtype.
    """
    b, hq, q, d = query.shape
    hkv = layer.num_heads
    n_rep = hq // hkv
    rows = n_rep * q
    qf = (query.float().reshape(b, hkv, rows, d) * scaling).contiguous()
    keys, values = layer.key_blocks, layer.value_blocks
    window = layer.step_window()
    total = keys.shape[2] * keys.shape[3]  # every block slot, the scratch slot included
    device = query.device

    scores = torch.empty(b, hkv, rows, total, dtype=torch.float32, device=device)
    if cpu_kernel:
        kernel_key_scores_parts(qf, [keys], scores, 0)
    else:
        quantized_key_scores(qf, keys, scores, DEFAULT_CHUNK_TOKENS)
    pos = torch.arange(total, device=device)
    quantized = pos < window.boundary
    target = window.targets(total)  # the window's slots at their positions
    in_window = torch.zeros(total, dtype=torch.bool, device=device).scatter(0, target, window.valid)
    window_scores = torch.matmul(qf, window.keys.float().transpose(-1, -2))  # [B, H, M, S]
    slots = window.keys.shape[2]
    scores = scores.scatter(-1, target.expand(b, hkv, rows, slots), window_scores)

    # query i sits at position end - q + i; its keys are the held ones up to it, and what the model's mask keeps
    query_pos = window.end - q + torch.arange(q, device=device)
    keep = ((quantized | in_window) & (pos <= query_pos[:, None])).expand(b, 1, q, total)
    if attention_mask is not None:
        width = attention_mask.shape[-1]
        model_keep = keep_mask(attention_mask, b, q, width, device).expand(b, 1, q, width)
        keep = keep & torch.nn.functional.pad(model_keep, (0, total - width), value=False)
    keep = keep.unsqueeze(2).expand(b, 1, n_rep, q, total).reshape(b, 1, rows, total)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a row with nothing to attend to (fully padded): 0, as SDPA gives

    out = torch.zeros(b, hkv, rows, layer.value_head_dim, dtype=torch.float32, device=device)
    block_probs = probs.masked_fill(~quantized, 0.0).contiguous()  # the slots past the boundary hold stale codes
    if cpu_kernel:
        kernel_value_output_parts(block_probs, 0, [values], out)
    else:
        quantized_value_output(block_probs, values, out, DEFAULT_CHUNK_TOKENS)
    window_probs = probs.gather(-1, target.expand(b, hkv, rows, slots)).masked_fill(~window.valid, 0.0)
    out = out + torch.matmul(window_probs, window.values.float())
    return out.reshape(b, hq, q, -1).to(query.dtype)
