"""Dropping middle blocks from a left-padded batch: each row keeps its own sinks.

Rows of a left-padded batch have ``p_r`` padding tokens first. Blocks are
shared by the rows, so a drop removes the same cache slots from every row:
the oldest ``offset`` tokens after the sinks. transformers builds the mask
from ``get_mask_sizes``: held slot ``i`` is read at column ``offset + i`` of
the attention mask. For every slot after the sinks that column is the token's
true position, so padding stays masked there; the sink slots are read at
``offset + j`` although they hold positions ``0 .. s-1``, so once drops pass
a padded row's padding, its padding sinks would be read as real tokens, and
its real first tokens (its attention sinks) sit in the blocks that drops
remove first.

What each row should hold, StreamingLLM per row: drop its padding first,
then its oldest real tokens after its first ``s`` real ones. With ``offset``
tokens dropped a row still holds ``d_r = max(0, p_r - offset)`` padding
tokens, then its real tokens. Since the blocks after the sinks are the same
slots for every row, that is reached by refilling the ``s`` sink slots of
each row at every drop: the row's held tokens before the drop, from its sink
slots on, read ``[d_old padding | real ...]``; the new sink slots are that
sequence from ``a_r = d_old - d_new`` (the padding the drop removes) for
``s`` tokens: ``d_new`` padding slots, then the row's first real tokens.
Slot ``j`` is then real exactly when ``offset + j >= p_r``, which is what the
mask says. Real tokens taken into the sink slots from blocks are their
dequantized values (a row alone keeps its sinks exact from the start).
A row with no padding is left as it was.

The cache cannot see the attention mask (the model does not pass it to
``update``), so a padded batch declares its padding:
``QuantizedKVCache.set_left_padding(attention_mask)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["left_padding_counts", "move_sinks_past_padding"]


def left_padding_counts(attention_mask: torch.Tensor | Sequence[int] | None) -> torch.Tensor | None:
    """Padding tokens at the front of each row, from a ``[batch, length]`` 0/1 attention mask (left padded: every
    row's zeros before its ones) or from the counts themselves; None: no padding declared."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        counts = torch.as_tensor(list(attention_mask), dtype=torch.long)
        if counts.dim() != 1 or (counts < 0).any():
            raise ValueError(f"`attention_mask` as padding counts has to be non-negative integers but got "
                             f"{counts.tolist()}")  # fmt: skip
        return counts
    if attention_mask.dim() != 2:
        raise ValueError(f"`attention_mask` has to be [batch, length] but got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.detach().to("cpu", torch.long)
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("`attention_mask` has to hold 0 (padding) and 1 (tokens) only")
    if (mask[:, 1:] < mask[:, :-1]).any():
        rows = sorted({int(r) for r in torch.nonzero(mask[:, 1:] < mask[:, :-1])[:, 0]})
        raise ValueError(
            f"`attention_mask` rows {rows[:5]} are not left padded (a 0 after a 1); drops need the padding first: "
            "set `tokenizer.padding_side = 'left'`"
        )
    return (mask == 0).sum(dim=1)


def move_sinks_past_padding(layer: Any, blocks: int, padding: torch.Tensor) -> None:
    """Before ``layer`` drops its oldest ``blocks`` blocks: refill each row's sink slots (see the module
    docstring). ``padding``: padding tokens per row."""
    s = layer.sink_keys.shape[-2]
    if not s or not blocks:
        return
    if padding.shape[0] != layer.batch_size:
        raise ValueError(
            f"{layer._name()}: the left padding declared has {padding.shape[0]} rows but the cache holds "
            f"{layer.batch_size}; call `set_left_padding` with this batch's attention mask"
        )
    offset = layer.dropped_tokens
    held_padding = (padding - offset).clamp(min=0)
    shift = held_padding - (padding - offset - blocks * layer.group_size).clamp(min=0)  # padding the drop removes
    width = int(shift.max())
    if width == 0:
        return
    device = layer.sink_keys.device
    # [B, s]: row r's new sink slots are its held tokens shift[r] .. shift[r] + s
    index = (shift.to(device)[:, None] + torch.arange(s, device=device)[None, :])[:, None, :, None]
    for stream in ("keys", "values"):
        held = layer.history(stream)[:, :, : s + width]  # [B, H, s + width, D]: sinks, then the oldest blocks
        sinks = torch.gather(held, 2, index.expand(-1, held.shape[1], -1, held.shape[-1]))
        setattr(layer, f"sink_{stream}", sinks.to(getattr(layer, f"sink_{stream}").dtype))
