"""Quantized token blocks of one layer's keys or values (the append-only history).

A block is ``group_size`` (G) consecutive tokens. Blocks are stored as one
``QuantizedTensor`` per bit width, in the logical shape ``[B, H, n_blocks, G, D]``:

- ``channel`` grouping: the group axis is G (dim 3): one scale per channel per block.
- ``token`` grouping: the group axis is D (dim 4), cut into groups of G channels.

The block axis (dim 2) comes before either group axis, so appending blocks is
a concatenation along dim 2 of data, scale and zero alike: history is never
re-quantized. With mixed precision, blocks that age out of the newest
``int8_tokens`` are re-packed once from the ``recent`` tier to the ``aged`` one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .quantization import QuantizedTensor, dequantize, quantize, unpack_codes

__all__ = ["BlockCodec", "QuantizedBlocks", "concat_blocks"]

_BLOCK_DIM = 2


@dataclass(frozen=True)
class BlockCodec:
    """How one stream (keys or values) of one layer is quantized."""

    bits: int
    group_size: int
    axis: str  # "channel" | "token"
    symmetric: bool = False
    scale_dtype: torch.dtype | None = None  # None: the input's dtype
    clip_percentile: float | None = None

    @property
    def quant_axis(self) -> int:
        # in [B, H, n, G, D]: channel grouping runs along G, token grouping along D
        return 3 if self.axis == "channel" else 4

    def encode(self, tokens: torch.Tensor, bits: int | None = None) -> QuantizedTensor:
        """[B, H, n*G, D] -> QuantizedTensor of logical shape [B, H, n, G, D]."""
        b, h, length, d = tokens.shape
        g = self.group_size
        blocks = tokens.reshape(b, h, length // g, g, d)
        return quantize(
            blocks,
            bits=bits or self.bits,
            group_size=g,
            axis=self.quant_axis,
            symmetric=self.symmetric,
            scale_dtype=self.scale_dtype,
            clip_percentile=self.clip_percentile,
        )


def _cat(parts: list[QuantizedTensor]) -> QuantizedTensor:
    first = parts[0]
    if len(parts) == 1:
        return first
    shape = list(first.shape)
    shape[_BLOCK_DIM] = sum(p.shape[_BLOCK_DIM] for p in parts)
    return QuantizedTensor(
        data=torch.cat([p.data for p in parts], dim=_BLOCK_DIM),
        scale=torch.cat([p.scale for p in parts], dim=_BLOCK_DIM),
        zero=None if first.zero is None else torch.cat([p.zero for p in parts], dim=_BLOCK_DIM),
        bits=first.bits,
        group_size=first.group_size,
        axis=first.axis,
        shape=tuple(shape),
        dtype=first.dtype,
    )


def _slice(q: QuantizedTensor, start: int, end: int) -> QuantizedTensor:
    """Blocks [start, end) as a compact copy (a view would pin the whole buffer)."""
    shape = list(q.shape)
    shape[_BLOCK_DIM] = end - start
    return q.map_tensors(lambda t: t[:, :, start:end].clone(), new_shape=tuple(shape))


def _dequantize_into(q: QuantizedTensor, out: torch.Tensor) -> None:
    """Write the blocks of ``q`` as tokens into ``out`` ([B, H, n*G, D], may be a strided view)."""
    b, h, n, g, d = q.shape
    blocks = out.view(b, h, n, g, d)
    if q.axis == 3:  # channel grouping, grouped layout [B, H, n, D, 1, G]
        target = blocks.transpose(3, 4).unsqueeze(-2)
    else:  # token grouping, grouped layout [B, H, n, G, D // G, G]
        target = blocks.view(b, h, n, g, d // q.group_size, q.group_size)
    # uint8 codes converted straight into the output: no full-size float temporary
    target.copy_(unpack_codes(q.data, q.bits))
    if q.zero is None:
        target.sub_(2 ** (q.bits - 1))
    target.mul_(q.scale.unsqueeze(-1))
    if q.zero is not None:
        target.add_(q.zero.unsqueeze(-1))


class QuantizedBlocks:
    """Append-only quantized history of one stream, in one or two precision tiers."""

    def __init__(self, codec: BlockCodec, aged_bits: int | None = None, recent_tokens: int = 0):
        self.codec = codec
        self.aged_bits = aged_bits
        # blocks older than the newest `recent_tokens` are re-packed to `aged_bits`
        self.recent_tokens = recent_tokens
        self.aged: QuantizedTensor | None = None
        self.recent: QuantizedTensor | None = None

    @property
    def tiers(self) -> list[QuantizedTensor]:
        return [t for t in (self.aged, self.recent) if t is not None]

    @property
    def num_blocks(self) -> int:
        return sum(t.shape[_BLOCK_DIM] for t in self.tiers)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.codec.group_size

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tiers)

    def append(self, tokens: torch.Tensor) -> None:
        """Quantize [B, H, n*G, D] as n new blocks; only they are touched."""
        new = self.codec.encode(tokens)
        self.recent = new if self.recent is None else _cat([self.recent, new])
        if self.aged_bits is not None:
            self._age()

    def append_encoded(self, blocks: QuantizedTensor) -> None:
        """Append blocks that were already quantized with this codec (no re-quantization)."""
        if blocks.bits != self.codec.bits or blocks.group_size != self.codec.group_size:
            raise ValueError(
                f"blocks of {blocks.bits} bits / group {blocks.group_size} cannot be appended to a stream of "
                f"{self.codec.bits} bits / group {self.codec.group_size}"
            )
        self.recent = blocks if self.recent is None else _cat([self.recent, blocks])
        if self.aged_bits is not None:
            self._age()

    def _age(self) -> None:
        keep = self.recent_tokens // self.codec.group_size
        excess = self.recent.shape[_BLOCK_DIM] - keep
        if excess <= 0:
            return
        old = _slice(self.recent, 0, excess)
        self.recent = _slice(self.recent, excess, self.recent.shape[_BLOCK_DIM]) if keep > 0 else None
        # The one re-quantization mixed precision allows: INT8 -> aged bits, once per block.
        tokens = dequantize(old).flatten(2, 3)
        repacked = self.codec.encode(tokens, bits=self.aged_bits)
        self.aged = repacked if self.aged is None else _cat([self.aged, repacked])

    def dequantize_into(self, out: torch.Tensor) -> None:
        """Write all blocks, oldest first, into ``out`` of shape [B, H, num_tokens, D]."""
        start = 0
        for tier in self.tiers:
            length = tier.shape[_BLOCK_DIM] * self.codec.group_size
            _dequantize_into(tier, out[:, :, start : start + length])
            start += length

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        first = self.tiers[0]
        b, h, _, _, d = first.shape
        out = torch.empty(b, h, self.num_tokens, d, dtype=dtype, device=first.device)
        self.dequantize_into(out)
        return out

    def drop_last_tokens(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        """Remove the last ``count`` tokens. Whole blocks go; the surviving head of a
        partly removed block is returned dequantized (to rejoin the residual window)."""
        g = self.codec.group_size
        n_drop = -(-count // g)
        kept_tokens = n_drop * g - count
        dropped = []
        for name in ("recent", "aged"):
            tier = getattr(self, name)
            if tier is None or n_drop == 0:
                continue
            n = tier.shape[_BLOCK_DIM]
            take = min(n, n_drop)
            dropped.insert(0, _slice(tier, n - take, n))
            setattr(self, name, _slice(tier, 0, n - take) if take < n else None)
            n_drop -= take
        if n_drop:
            raise ValueError(f"cannot drop {count} tokens from {self.num_tokens + count} quantized tokens")
        head = dequantize(dropped[0], dtype).flatten(2, 3)[:, :, :kept_tokens]
        return head.clone()

    def take_blocks(self, start: int, end: int) -> QuantizedTensor:
        """Blocks [start, end) of a single-tier stream, as stored (for export)."""
        if self.aged is not None:
            raise ValueError("exporting blocks of a mixed-precision stream with aged blocks is not supported")
        return _slice(self.recent, start, end)

    def map_tensors(self, fn) -> None:
        """Apply ``fn`` to every stored tensor (batch reorder / selection, device moves)."""
        for name in ("aged", "recent"):
            tier = getattr(self, name)
            if tier is not None:
                setattr(self, name, tier.map_tensors(fn))


# ---------------------------------------------------------------------- prefix reuse: assembling stored blocks


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
