"""Checks of what a caller hands a layer: key/value states, batch indices, autograd."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["batch_indices", "check_key_value_states", "tracks_grad"]


def tracks_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records operations on these tensors now."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def batch_indices(indices: Any, batch_size: int, device: torch.device) -> torch.Tensor:
    """``indices`` as a 1-d long tensor of rows in ``[0, batch_size)``: a tuple ``(0, 2)`` indexes rows, never
    dims 0 and 1 as ``t[(0, 2)]`` would."""
    idx = torch.as_tensor(indices, device=device)
    if idx.dtype == torch.bool:
        if idx.shape != (batch_size,):
            raise ValueError(f"a batch mask has to have {batch_size} entries but got shape {tuple(idx.shape)}")
        idx = idx.nonzero().flatten()
    if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"`indices` has to be a 1-d sequence of batch rows but got {indices!r}")
    idx = idx.long()
    if idx.numel() and (int(idx.min()) < -batch_size or int(idx.max()) >= batch_size):
        raise ValueError(f"`indices` {idx.tolist()} are out of range for a batch of {batch_size}")
    return idx % batch_size if idx.numel() else idx


def check_key_value_states(name: str, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    for arg, t in (("key_states", key_states), ("value_states", value_states)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"{name}: `{arg}` has to be a 4-d tensor [batch, num_kv_heads, seq_len, head_dim] "
                f"but got shape {shape}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name}: `{arg}` has to be floating point but got dtype {t.dtype}")
    if key_states.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty (key_states of shape {tuple(key_states.shape)})")
    if key_states.shape[:3] != value_states.shape[:3]:
        raise ValueError(
            f"{name}: key_states {tuple(key_states.shape)} and value_states {tuple(value_states.shape)} "
            "differ in batch, heads or seq_len"
        )
