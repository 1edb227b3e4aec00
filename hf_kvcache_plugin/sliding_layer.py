"""``QuantizedSlidingWindowLayer``: a sliding-window attention layer whose window is quantized too.

``DynamicSlidingWindowLayer`` keeps the last ``sliding_window - 1`` tokens in
full precision. This layer keeps the same tokens as ``QuantizedKVLayer`` does
(quantized blocks, then the exact residual window), and drops whole blocks
from the front once every token in them has left the window. So it holds at
most ``sliding_window - 1 + group_size - 1`` tokens (a block straddling the
window's start is kept whole), and tokens older than the window are never
quantized at all.

Attention sees exactly what ``DynamicSlidingWindowLayer`` shows it: ``update``
returns the last ``min(seen, sliding_window - 1)`` tokens plus the new ones,
and ``get_mask_sizes`` gives the same length and offset, so the model's
sliding mask is built as for ``DynamicCache`` and a hybrid model can mix these
layers with full ones. Decode steps through ``kvquant_sdpa`` read the packed
blocks as for full-attention layers, the held tokens before the window (at
most ``group_size - 1``, in the block straddling its start) masked out
(``attention_window``); with ``attention="dequantize"`` a step dequantizes
the visible window instead.

Sinks make no sense in a window (they leave it), so this layer keeps none.
``residual_length`` still holds the newest tokens exact; a window no larger
than ``residual_length + 1`` stays wholly exact (the cache warns).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .layer import LayerSettings, QuantizedKVLayer

__all__ = ["QuantizedSlidingWindowLayer"]


class QuantizedSlidingWindowLayer(QuantizedKVLayer):
    """One sliding-window layer, quantized: ``QuantizedSlidingWindowLayer(settings, sliding_window=4096)``."""

    is_sliding = True

    def __init__(self, settings: LayerSettings | None = None, *, sliding_window: int, **options: Any):
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"`sliding_window` has to be a positive integer but got {sliding_window!r}")
        self.sliding_window = sliding_window
        super().__init__(settings, **options)
        if self.settings.sink_tokens:
            self.settings = dataclasses.replace(self.settings, sink_tokens=0)

    def _clear(self) -> None:
        super()._clear()
        self._dropped = 0  # tokens that left the window and were dropped from the front

    @property
    def window_dropped_tokens(self) -> int:
        """Tokens that left the window and were dropped from the front (counted by ``get_seq_length``)."""
        return self._dropped

    @window_dropped_tokens.setter
    def window_dropped_tokens(self, count: int) -> None:  # a snapshot's restore
        self._dropped = count

    @property
    def _keep(self) -> int:
        """Tokens the next step still attends to, as ``DynamicSlidingWindowLayer`` keeps them."""
        return max(self.sliding_window - 1, 0)

    def _writes_window_in_place(self, held: int, new: int, had_history: bool) -> bool:
        # the window's front moves with the sliding bound, and `nbytes_after_append` counts its tokens: the exact
        # window is concatenated here (decode on sliding layers dequantizes anyway)
        return False

    # ------------------------------------------------------------------ the window's bound
    def _drop_counts(self, blocks: int, residual: int, bound: int) -> tuple[int, int]:
        """(blocks, residual tokens) to drop from the front of ``blocks`` quantized blocks followed by ``residual``
        exact tokens so that no whole block lies before the last ``bound`` tokens."""
        excess = blocks * self.group_size + residual - bound
        if excess <= 0:
            return 0, 0
        drop_blocks = min(blocks, excess // self.group_size)
        # with no block left the oldest tokens are in the residual window, and go token by token
        drop_residual = excess - blocks * self.group_size if drop_blocks == blocks else 0
        return drop_blocks, drop_residual

    def _drop_outside_window(self, bound: int) -> None:
        blocks, residual = self.quantized_keys.num_blocks, self.residual_keys.shape[-2]
        drop_blocks, drop_residual = self._drop_counts(blocks, residual, bound)
        if drop_blocks:
            self.quantized_keys.drop_oldest(drop_blocks)
            self.quantized_values.drop_oldest(drop_blocks)
        if drop_residual:
            # clone: a slice would keep the whole old window alive
            self.residual_keys = self.residual_keys[:, :, drop_residual:].clone()
            self.residual_values = self.residual_values[:, :, drop_residual:].clone()
        dropped = drop_blocks * self.group_size + drop_residual
        self._length -= dropped
        self._dropped += dropped

    def _flush_full_blocks(self, keep: int) -> None:
        # tokens that no block kept after this flush can reach are dropped before it, not quantized: at most
        # `group_size - 1` tokens beyond the window are ever held
        self._drop_outside_window(self._keep + self.group_size - 1)
        super()._flush_full_blocks(keep)
        self._drop_outside_window(self._keep)

    # ------------------------------------------------------------------ what attention sees
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        # what DynamicSlidingWindowLayer returns: the window held before this step, then the new tokens
        visible = min(self.get_seq_length() - n, self._keep) + n
        return keys[:, :, keys.shape[-2] - visible :], values[:, :, values.shape[-2] - visible :]

    def history(self, stream: str) -> torch.Tensor:
        """The tokens the next step attends to (the last ``sliding_window - 1``), dense, as
        ``DynamicSlidingWindowLayer.keys`` / ``.values`` hold them."""
        dense = self._dense(stream)
        return dense[:, :, dense.shape[-2] - min(self.get_seq_length(), self._keep) :]

    def get_seq_length(self) -> int:
        return self._length + self._dropped

    def get_max_length(self) -> int:
        return self.sliding_window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        seen = self.get_seq_length()
        return min(seen, self._keep) + query_length, max(seen - self._keep, 0)

    def attention_window(self, query_length: int) -> tuple[int, int]:
        """(held tokens before the window, tokens in it) for a step whose ``query_length`` new tokens were appended
        already (the fused path): the model's mask covers the second count, ``get_mask_sizes``' length."""
        held = self._length - self.dropped_tokens
        visible = min(self.get_seq_length() - query_length, self._keep) + query_length
        return held - visible, visible

    def window_dequantized(self, query_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values such a step attends to (``attention_window``'s second count), dense: what the fused
        path falls back to. (``dequantized()`` is the window the *next* step sees.)"""
        _, visible = self.attention_window(query_length)
        keys, values = self._materialize()
        return keys[:, :, keys.shape[2] - visible :], values[:, :, values.shape[2] - visible :]

    # ------------------------------------------------------------------ accounting and edits
    def nbytes_after_append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> int:
        """``nbytes`` once ``append`` and its flush (and the window's drops) are done, predicted. Exact unless
        mixed precision's aging and the window's drops meet in one step (then dropped blocks count at the aged
        width, an upper bound when they were still recent)."""
        n = key_states.shape[-2]
        blocks = self.quantized_keys.num_blocks if self.is_initialized else 0
        residual = (self.residual_keys.shape[-2] if self.is_initialized else 0) + n
        dropped_blocks, drop_residual = self._drop_counts(blocks, residual, self._keep + self.group_size - 1)
        blocks, residual = blocks - dropped_blocks, residual - drop_residual
        new_blocks = max(0, residual - self.residual_length) // self.group_size
        residual -= new_blocks * self.group_size
        more_blocks, drop_residual = self._drop_counts(blocks + new_blocks, residual, self._keep)
        dropped_blocks += more_blocks
        residual -= drop_residual
        b, h, _, d = key_states.shape
        dv = value_states.shape[-1]
        dtype = key_states.dtype
        dense = b * h * residual * (d + dv) * key_states.element_size()
        keys = self.quantized_keys if self.is_initialized else self.settings.blocks("keys")
        values = self.quantized_values if self.is_initialized else self.settings.blocks("values")
        repeat = b // self.batch_size if self.is_initialized and b % self.batch_size == 0 else 1
        total = dense
        for stream, dim in ((keys, d), (values, dv)):
            bits = stream.aged_bits if stream.aged_bits is not None else stream.codec.bits
            total += stream.nbytes_after(new_blocks, b, h, dim, dtype, repeat)
            total -= dropped_blocks * stream.codec.block_nbytes(b, h, dim, dtype, bits=bits)
        return total

    def stats(self) -> dict[str, int]:
        """As ``QuantizedKVLayer.stats``, against what ``DynamicSlidingWindowLayer`` would hold (``fp_bytes``)."""
        stats = super().stats()
        if self.is_initialized:
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            kept = min(self.get_seq_length(), self._keep)
            per_token = self.batch_size * self.num_heads * (self.head_dim + self.value_head_dim) * itemsize
            stats.update(seq_length=self.get_seq_length(), fp_bytes=per_token * kept)
        return stats

    def crop(self, tokens_to_remove: int) -> None:
        """Remove ``-tokens_to_remove`` tokens from the end, as long as the window they leave is still held."""
        count = -tokens_to_remove
        if count > 0 and self.is_initialized:
            seen = self.get_seq_length()
            if count <= self._length and self._length - count < min(seen - count, self._keep):
                raise RuntimeError(
                    f"{self._name()}: cannot crop {count} tokens: this sliding-window layer holds the last "
                    f"{self._length} of {seen} tokens, and after the crop it would lack the window's "
                    f"{min(seen - count, self._keep)} tokens"
                )
        super().crop(tokens_to_remove)
