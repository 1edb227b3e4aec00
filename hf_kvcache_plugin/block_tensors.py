"""Tensors of quantized blocks ``[B, H, n_blocks, G, D]``: concatenating, slicing and cutting them into parts.

The block dim (2) precedes either group axis, so blocks concatenate and slice
along it in data, scale and zero alike. ``blocks.QuantizedBlocks`` holds a
tier as parts cut at fixed block positions of the stream (``part_end``): four
parts of the first size, four of twice it, four of four times, then parts of
eight times. Why parts, and why at fixed positions: see ``blocks``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .quantization import QuantizedTensor

__all__ = ["append_parts", "blocks_of", "cat_blocks", "concat_blocks", "part_end", "slice_blocks", "take_blocks"]

_BLOCK_DIM = 2
_PARTS_PER_SIZE, _SIZE_STEPS = 4, 3  # four parts of each size; sizes x1, x2, x4, then x8 from there on


def _to_physical(q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """data/scale/zero with the group dims back at ``q.axis``: the order ``quantize`` writes them in.

    Channel-grouped keys are stored token-major (``[B, H, n, 1, G/per_byte, D]`` in memory), so that
    dequantizing writes whole rows of head_dim; concatenating and slicing in this view keeps it so.
    """
    a = q.axis
    zero = None if q.zero is None else q.zero.movedim(-1, a)
    return q.data.movedim((-2, -1), (a, a + 1)), q.scale.movedim(-1, a), zero


def _from_physical(q: QuantizedTensor, data, scale, zero, n_blocks: int) -> QuantizedTensor:
    a = q.axis
    shape = list(q.shape)
    shape[_BLOCK_DIM] = n_blocks
    return QuantizedTensor(
        data=data.movedim((a, a + 1), (-2, -1)),
        scale=scale.movedim(a, -1),
        zero=None if zero is None else zero.movedim(a, -1),
        bits=q.bits,
        group_size=q.group_size,
        axis=a,
        shape=tuple(shape),
        dtype=q.dtype,
    )


def cat_blocks(parts: list[QuantizedTensor]) -> QuantizedTensor:
    first = parts[0]
    if len(parts) == 1:
        return first
    # the block dim (2) precedes the group axis (3 or 4), so it is dim 2 in the physical view too
    physical = [_to_physical(p) for p in parts]
    return _from_physical(
        first,
        torch.cat([d for d, _, _ in physical], dim=_BLOCK_DIM),
        torch.cat([s for _, s, _ in physical], dim=_BLOCK_DIM),
        None if first.zero is None else torch.cat([z for _, _, z in physical], dim=_BLOCK_DIM),
        sum(p.shape[_BLOCK_DIM] for p in parts),
    )


def slice_blocks(q: QuantizedTensor, start: int, end: int) -> QuantizedTensor:
    """Blocks [start, end) as a compact copy (a view would pin the whole buffer)."""
    data, scale, zero = (
        None if t is None else t[:, :, start:end].contiguous() for t in _to_physical(q)
    )
    return _from_physical(q, data, scale, zero, end - start)


def blocks_of(parts: Sequence[QuantizedTensor]) -> int:
    return sum(p.shape[_BLOCK_DIM] for p in parts)


def part_end(block: int, first_part: int) -> int:
    """The stream position (in blocks) where the part holding ``block`` ends, for first parts of ``first_part``
    blocks: four parts of each size x1, x2, x4, then x8 parts on."""
    start = 0
    for step in range(_SIZE_STEPS):
        size = first_part << step
        if block < start + _PARTS_PER_SIZE * size:
            return start + ((block - start) // size + 1) * size
        start += _PARTS_PER_SIZE * size
    size = first_part << _SIZE_STEPS
    return start + ((block - start) // size + 1) * size


def append_parts(
    parts: list[QuantizedTensor], new: QuantizedTensor, first_part: int, first_block: int, copy: bool = False
) -> list[QuantizedTensor]:
    """``parts`` (a tier whose first block is block ``first_block`` of the stream) with the blocks of ``new``
    after them, cut where the stream's parts end (``_part_end``): the last part is filled up to its end, then
    new parts follow. Pieces are compact copies, except all of ``new`` when it is a whole part and ``copy`` is
    False (a tensor the caller made for this)."""
    parts = list(parts)
    n, start = new.shape[_BLOCK_DIM], 0
    end_of_tier = first_block + blocks_of(parts)
    while start < n:
        end = min(n, part_end(end_of_tier + start, first_part) - end_of_tier)
        piece = new if (start, end) == (0, n) and not copy else slice_blocks(new, start, end)
        if start == 0 and parts and part_end(end_of_tier - 1, first_part) > end_of_tier:
            parts[-1] = cat_blocks([parts[-1], piece])  # the last part does not reach its end yet: fill it
        else:
            parts.append(piece)
        start = end
    return parts


def take_blocks(parts: Sequence[QuantizedTensor], start: int, end: int) -> QuantizedTensor:
    """Blocks [start, end) of consecutive parts as one compact copy."""
    pieces, pos = [], 0
    for part in parts:
        n = part.shape[_BLOCK_DIM]
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            pieces.append(slice_blocks(part, lo - pos, hi - pos))
        pos += n
    if not pieces:
        raise ValueError(f"no blocks in [{start}, {end}) of {pos} blocks")
    return cat_blocks(pieces)


def concat_blocks(parts: Sequence[QuantizedTensor], dim: int) -> QuantizedTensor:
    """Concatenate blocks of logical shape [B, H, n, G, D] along the batch (0) or block (2) dim.

    Both dims precede either group axis, so data, scale and zero concatenate
    alike. The result is always a fresh copy, so it never aliases a stored entry.
    """
    if dim not in (0, _BLOCK_DIM):
        raise ValueError(f"`dim` has to be 0 (batch) or {_BLOCK_DIM} (blocks) but got {dim}")
    if not parts:
        raise ValueError("`parts` has to hold at least one QuantizedTensor")
    first = parts[0]
    for p in parts[1:]:
        same = (p.bits, p.group_size, p.axis, p.dtype, p.zero is None) == (
            first.bits, first.group_size, first.axis, first.dtype, first.zero is None
        )
        other_dims = [s for i, s in enumerate(p.shape) if i != dim]
        if not same or other_dims != [s for i, s in enumerate(first.shape) if i != dim]:
            raise ValueError(
                f"cannot concatenate blocks of shape {p.shape} ({p.bits} bits, group {p.group_size}, axis {p.axis}) "
                f"with blocks of shape {first.shape} ({first.bits} bits, group {first.group_size}, axis {first.axis}) "
                f"along dim {dim}"
            )
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return QuantizedTensor(
        data=torch.cat([p.data for p in parts], dim=dim),
        scale=torch.cat([p.scale for p in parts], dim=dim),
        zero=None if first.zero is None else torch.cat([p.zero for p in parts], dim=dim),
        bits=first.bits,
        group_size=first.group_size,
        axis=first.axis,
        shape=tuple(shape),
        dtype=first.dtype,
    )
