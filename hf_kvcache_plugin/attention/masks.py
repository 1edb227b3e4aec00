"""The attention mask as booleans, shared by the PyTorch and Triton paths."""

from __future__ import annotations

import torch

__all__ = ["keep_mask"]


def keep_mask(attention_mask, b: int, q: int, total: int, device) -> torch.Tensor | None:
    """Boolean [B, 1, q, T] of positions to keep, or None when every position is kept."""
    if attention_mask is None:
        if q == 1:
            return None
        # bottom-right causal: query i sits at position total - q + i
        pos_q = torch.arange(total - q, total, device=device)[:, None]
        return (torch.arange(total, device=device)[None, :] <= pos_q)[None, None].expand(b, 1, q, total)
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :total]
    return attention_mask[..., :total] > torch.finfo(attention_mask.dtype).min / 2
