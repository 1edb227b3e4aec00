"""Quantized token blocks of one layer's keys or values (the append-only history).

A block is ``group_size`` (G) consecutive tokens. Blocks are stored as one
``QuantizedTensor`` per bit width, in the logical shape ``[B, H, n_blocks, G, D]``:

- ``channel`` grouping: the group axis is G (dim 3): one scale per channel per block.
- ``token`` grouping: the group axis is D (dim 4), cut into groups of G channels.

The block axis (dim 2) comes before either group axis, so appending blocks is
a concatenation along dim 2 of data, scale and zero alike: history is never
re-quantized. With mixed precision, blocks that age out of the newest
``int8_tokens`` are re-packed once from the ``recent`` tier to the ``aged`` one.
A cache over its byte budget re-packs its oldest blocks to fewer bits
(``shrink``): those tiers, oldest and fewest bits first, are ``repacked`` and
precede ``aged``.

A tier is held in parts cut at fixed block positions of the stream: four
parts of ``PART_TOKENS`` tokens, four of twice that, four of four times, then
parts of eight times (256 ... 2048 tokens by default). A flush concatenates
onto the last part only, so its transient copy is at most one part, a small
fraction of the stream's history however long it grows (peak memory stays
close to what is stored), while a long history stays in few parts that the
kernel reads as long runs of memory. The partition depends only on block
positions, not on how the blocks arrived (one at a time, a prefill flushed at
once, a loaded prefix), so reads that sum part by part give the same bits
either way.

A block that cannot be quantized (NaN/Inf values, or a range whose scale
overflows the scale dtype) is kept in full precision instead: the packed tier
holds a zero placeholder for it, so every block keeps its position, and its
exact tokens live in ``full_precision_blocks``, which ``dequantize_into``
writes over the placeholder. Both count in ``nbytes``.

Inside a ``torch.compile`` trace the check cannot branch on the data (that
would break the graph at every flush), so there the blocks that cannot be
quantized get the placeholder codes branch-free (``torch.where``) and an
opaque op (``hf_kvcache_quant::keep_unquantizable``) keeps their exact tokens
when the compiled step runs. Nothing is held back for a later eager read: a
compiled ``generate`` makes none, so the flushed tokens would pile up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import itertools
import logging
import weakref

import torch

from .block_tensors import _BLOCK_DIM, append_parts, blocks_of, cat_blocks, concat_blocks, part_end, slice_blocks
from .block_tensors import take_blocks as take_from_parts
from .quantization import QuantizedTensor, dequantize, dequantize_into, quantize

__all__ = [
    "BlockCodec", "QuantizedBlocks", "as_placeholders", "concat_blocks", "unquantizable_blocks", "unquantizable_mask",
]

# tokens of a tier's first parts; later parts double every four parts up to 8x (see the module docstring)
PART_TOKENS = 256

logger = logging.getLogger(__name__)


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

    def block_nbytes(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, bits: int | None = None) -> int:
        """Bytes of one encoded block of ``[batch, heads, G, head_dim]`` tokens of ``dtype``: packed codes, then a
        scale (and a zero unless symmetric) per group. Either grouping cuts a block into ``head_dim`` groups per
        (batch, head): G tokens of a channel, or G channels of a token."""
        bits = bits or self.bits
        meta_itemsize = (self.scale_dtype or dtype).itemsize
        groups = batch * heads * head_dim
        codes = groups * self.group_size * bits // 8
        return codes + groups * meta_itemsize * (1 if self.symmetric else 2)


def unquantizable_mask(q: QuantizedTensor) -> torch.Tensor:
    """Bool [n]: blocks (along dim 2) whose scale or zero is not finite in some batch row or head."""
    n = q.shape[_BLOCK_DIM]
    finite = torch.isfinite(q.scale).reshape(*q.scale.shape[:3], -1).all(-1)  # [B, H, n]
    if q.zero is not None:
        finite &= torch.isfinite(q.zero).reshape(*q.zero.shape[:3], -1).all(-1)
    return ~finite.reshape(-1, n).all(0)


def unquantizable_blocks(q: QuantizedTensor) -> list[int]:
    """Indices (along dim 2) of blocks whose scale or zero is not finite: their codes mean nothing.

    NaN/Inf inputs propagate into the group min/max, and a finite range too
    wide for the scale dtype (fp16 tops out at 65504) overflows to Inf once
    stored, so checking the stored metadata catches both.
    """
    # one device sync per flushed batch of blocks, not per token
    return torch.nonzero(unquantizable_mask(q)).flatten().tolist()


def as_placeholders(q: QuantizedTensor, bad: torch.Tensor) -> QuantizedTensor:
    """``q`` with the blocks flagged in ``bad`` [n] replaced, branch-free, by the encoding of zeros.

    That is what quantizing a zero block stores: codes 0 (asymmetric) or the offset 2**(bits-1) (symmetric),
    the smallest normal scale, zero offset 0.
    """

    def flagged(t: torch.Tensor) -> torch.Tensor:  # [1, 1, n, 1, ...] against dims 0-2
        return bad.view(1, 1, -1, *([1] * (t.dim() - 3)))

    per_byte = 8 // q.bits
    code = 0 if q.zero is not None else 2 ** (q.bits - 1)
    zero_byte = sum(code << (i * q.bits) for i in range(per_byte))
    tiny = torch.finfo(q.scale.dtype).tiny
    return QuantizedTensor(
        data=torch.where(flagged(q.data), torch.full((), zero_byte, dtype=torch.uint8, device=q.data.device), q.data),
        scale=torch.where(flagged(q.scale), torch.full((), tiny, dtype=q.scale.dtype, device=q.scale.device), q.scale),
        zero=None if q.zero is None else torch.where(flagged(q.zero), torch.zeros((), dtype=q.zero.dtype,
                                                                                 device=q.zero.device), q.zero),
        bits=q.bits,
        group_size=q.group_size,
        axis=q.axis,
        shape=q.shape,
        dtype=q.dtype,
    )


def _dequantize_into(q: QuantizedTensor, out: torch.Tensor) -> None:
    """Write the blocks of ``q`` as tokens into ``out`` ([B, H, n*G, D], may be a strided view)."""
    dequantize_into(q, out.view(q.shape))


# streams by handle, for the op below: it runs inside compiled steps, where only numbers and tensors pass.
# A plain dict of weak references (a stream can be built inside a trace, and Dynamo cannot build the keyed
# references of a WeakValueDictionary); dead entries are pruned as new streams register.
_STREAMS: dict[int, weakref.ref] = {}
_HANDLES = itertools.count(1)
_PRUNE_EVERY = 1024
# exact blocks kept for a stream built in the same compiled graph: Dynamo registers such a stream only after
# the graph has run, so the op parks them here and the stream takes them at its next eager read
_PENDING: dict[int, list[tuple[int, torch.Tensor, list[int]]]] = {}


@torch.library.custom_op("hf_kvcache_quant::keep_unquantizable", mutates_args=())
def _keep_unquantizable(handle: int, first_block: int, tokens: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """Keep the exact tokens of the flagged blocks in the stream ``handle``; returns the flags (a copy)."""
    ref = _STREAMS.get(handle)
    stream = None if ref is None else ref()
    flagged = torch.nonzero(bad).flatten().tolist()
    if flagged:
        if stream is None:
            g = tokens.shape[-2] // bad.numel()
            exact = torch.cat([tokens[:, :, i * g : (i + 1) * g] for i in flagged], dim=-2)
            _PENDING.setdefault(handle, []).append((first_block, exact, flagged))
            kept = len(flagged)
        else:
            kept = stream._keep_exact(first_block, tokens, flagged)
        if kept:
            logger.warning("%d block(s) flushed inside torch.compile could not be quantized (NaN/Inf or out of "
                           "the scale range); kept in full precision", kept)
    return bad.clone()


@_keep_unquantizable.register_fake
def _(handle, first_block, tokens, bad):
    return torch.empty_like(bad)


class QuantizedBlocks:
    """Append-only quantized history of one stream, in one or two precision tiers."""

    def __init__(self, codec: BlockCodec, aged_bits: int | None = None, recent_tokens: int = 0):
        self.codec = codec
        self.aged_bits = aged_bits
        # blocks older than the newest `recent_tokens` are re-packed to `aged_bits`
        self.recent_tokens = recent_tokens
        # blocks of a tier's first parts (see the module docstring)
        self.part_blocks = max(1, PART_TOKENS // codec.group_size)
        # the tiers, each as its parts oldest first: blocks at the codec's bits, then (mixed) older ones at aged_bits
        self._recent: list[QuantizedTensor] = []
        self._aged: list[QuantizedTensor] = []
        # tiers older than `aged`, fewest bits first, made by a budget shrink (`replace_tiers`)
        self.repacked: list[QuantizedTensor] = []
        # block index (aged first, then recent) -> exact tokens [B, H, G, D] of a block that could not be quantized
        self._full_precision_blocks: dict[int, torch.Tensor] = {}
        self._fallback_events = 0  # blocks ever kept in full precision (not decremented by crop)
        self._register()

    def _register(self) -> None:
        """A number naming this stream to the op that keeps exact blocks inside compiled steps."""
        self._handle = next(_HANDLES)
        _STREAMS[self._handle] = weakref.ref(self)
        if self._handle % _PRUNE_EVERY == 0 and not torch.compiler.is_compiling():
            for handle in [h for h, ref in _STREAMS.items() if ref() is None]:
                del _STREAMS[handle]

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._register()  # a copy is a stream of its own

    def _take_pending(self) -> None:
        # `not is_compiling()` first: a trace must not read (and guard on) the global dict
        if not torch.compiler.is_compiling() and _PENDING:
            for first_block, exact, flagged in _PENDING.pop(self._handle, ()):
                self._keep_exact(first_block, exact, flagged, packed=True)

    @property
    def full_precision_blocks(self) -> dict[int, torch.Tensor]:
        self._take_pending()
        return self._full_precision_blocks

    @full_precision_blocks.setter
    def full_precision_blocks(self, blocks: dict[int, torch.Tensor]) -> None:
        self._full_precision_blocks = blocks

    @property
    def fallback_events(self) -> int:
        self._take_pending()
        return self._fallback_events

    @fallback_events.setter
    def fallback_events(self, count: int) -> None:
        self._fallback_events = count

    def _keep_exact(self, first_block: int, tokens: torch.Tensor, bad: list[int], packed: bool = False) -> int:
        """Keep the exact tokens of the blocks ``bad`` (indices into ``tokens``' blocks, or with ``packed`` into
        the blocks ``bad`` whose tokens follow one another in ``tokens``); returns how many were new."""
        g = self.codec.group_size
        kept = 0
        for j, i in enumerate(bad):
            if first_block + i not in self._full_precision_blocks:
                at = j if packed else i
                self._full_precision_blocks[first_block + i] = tokens[:, :, at * g : (at + 1) * g].clone()
                self._fallback_events += 1
                kept += 1
        return kept

    @property
    def tiers(self) -> list[QuantizedTensor]:
        """The stored blocks as consecutive tensors (tier parts), oldest first; bits never rise from one to the next."""
        return [*self.repacked, *self._aged, *self._recent]

    @property
    def recent(self) -> QuantizedTensor | None:
        """The blocks at the codec's bits as one tensor (a copy when held in several parts: for inspection)."""
        return take_from_parts(self._recent, 0, blocks_of(self._recent)) if self._recent else None

    @property
    def aged(self) -> QuantizedTensor | None:
        """The blocks at ``aged_bits`` (mixed precision) as one tensor (a copy when held in several parts)."""
        return take_from_parts(self._aged, 0, blocks_of(self._aged)) if self._aged else None

    def replace_tiers(self, tiers: list[QuantizedTensor]) -> None:
        """Store ``tiers`` (tensors of blocks, oldest first) instead: the newest run at the codec's bits is
        ``recent``, the run before it at ``aged_bits`` is ``aged`` (so aging keeps appending where it did), the rest
        are ``repacked``. ``recent`` and ``aged`` are re-cut into parts from their first block."""
        tiers = list(tiers)
        runs: dict[str, list[QuantizedTensor]] = {"recent": [], "aged": []}
        for name, bits in (("recent", self.codec.bits), ("aged", self.aged_bits)):
            while bits is not None and tiers and tiers[-1].bits == bits:
                runs[name].insert(0, tiers.pop())
        self.repacked = tiers
        self._aged = self._as_parts(runs["aged"], blocks_of(tiers))
        self._recent = self._as_parts(runs["recent"], blocks_of(tiers) + blocks_of(self._aged))

    def _as_parts(self, tensors: list[QuantizedTensor], first_block: int) -> list[QuantizedTensor]:
        """Consecutive tensors of one tier (starting at stream block ``first_block``) cut into the stream's parts;
        tensors that already are such parts are kept, not copied."""
        parts: list[QuantizedTensor] = []
        at = first_block
        for t in tensors:
            n = t.shape[_BLOCK_DIM]
            starts_a_part = not parts or part_end(at - 1, self.part_blocks) == at
            if starts_a_part and part_end(at, self.part_blocks) >= at + n:
                parts.append(t)
            else:
                parts = append_parts(parts, t, self.part_blocks, first_block, copy=True)
            at += n
        return parts

    def blocks_at_bits(self, bits: int) -> int:
        return sum(t.shape[_BLOCK_DIM] for t in self.tiers if t.bits == bits)

    def repack_oldest(self, from_bits: int, to_bits: int, count: int) -> int:
        """Re-pack the oldest ``count`` blocks held at ``from_bits`` to ``to_bits`` (a budget shrink); returns how
        many there were. As aging does: each block is dequantized from its codes and encoded once at fewer bits
        (a block whose range overflows the coarser scale is kept exact)."""
        out: list[QuantizedTensor] = []
        left, first = count, 0
        for tier in self.tiers:
            n = tier.shape[_BLOCK_DIM]
            take = min(n, left) if tier.bits == from_bits else 0
            if take:
                tokens = dequantize(slice_blocks(tier, 0, take)).flatten(2, 3)
                new = self._encode_or_keep(tokens, first_block=first, bits=to_bits)
                # bits never fall towards newer blocks, so the re-packed blocks join the tier just before them
                if out and out[-1].bits == to_bits:
                    out[-1] = cat_blocks([out[-1], new])
                else:
                    out.append(new)
                left -= take
            if take < n:
                out.append(slice_blocks(tier, take, n) if take else tier)
            first += n
        self.replace_tiers(out)
        return count - left

    @property
    def num_blocks(self) -> int:
        return sum(t.shape[_BLOCK_DIM] for t in self.tiers)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.codec.group_size

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tiers) + self.full_precision_nbytes

    @property
    def full_precision_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.full_precision_blocks.values())

    def nbytes_after(
        self, new_blocks: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype, repeat: int = 1
    ) -> int:
        """``nbytes`` once ``new_blocks`` blocks of ``[batch, heads, G, head_dim]`` ``dtype`` tokens are appended and
        aged, predicted without touching the history (blocks that cannot be quantized, which are kept exact,
        excepted). ``repeat``: the history's rows are repeated that many times first (a batch expanded)."""
        block = self.codec.block_nbytes(batch, heads, head_dim, dtype)
        grown = self.nbytes * repeat + new_blocks * block
        if self.aged_bits is None:
            return grown
        recent = blocks_of(self._recent) + new_blocks
        aging = max(0, recent - self.recent_tokens // self.codec.group_size)
        return grown - aging * (block - self.codec.block_nbytes(batch, heads, head_dim, dtype, bits=self.aged_bits))

    def append(self, tokens: torch.Tensor) -> None:
        """Quantize [B, H, n*G, D] as n new blocks; only they are touched."""
        # encoded part by part: blocks are independent, and a long prefill never holds two copies of its codes
        g, n = self.codec.group_size, tokens.shape[-2] // self.codec.group_size
        tier_start = blocks_of(self.repacked) + blocks_of(self._aged)
        start = 0
        while start < n:
            at = tier_start + blocks_of(self._recent)
            end = min(n, start + part_end(at, self.part_blocks) - at)
            new = self._encode_or_keep(tokens[:, :, start * g : end * g], first_block=at)
            self._recent = append_parts(self._recent, new, self.part_blocks, tier_start)
            start = end
        if self.aged_bits is not None:
            self._age()

    def _encode_or_keep(self, tokens: torch.Tensor, first_block: int, bits: int | None = None) -> QuantizedTensor:
        """Encode [B, H, n*G, D]; blocks that cannot be quantized are kept exact and encoded as zeros."""
        encoded = self.codec.encode(tokens, bits=bits)
        if torch.compiler.is_compiling():
            # no data-dependent branch in a trace: placeholders branch-free, the exact tokens kept by an op
            # that runs with the step (its output feeds the placeholders, so it is neither dropped nor moved)
            bad_mask = torch.ops.hf_kvcache_quant.keep_unquantizable(self._handle, first_block, tokens,
                                                                     unquantizable_mask(encoded))
            return as_placeholders(encoded, bad_mask)
        bad = unquantizable_blocks(encoded)
        if not bad:
            return encoded
        g = self.codec.group_size
        self._keep_exact(first_block, tokens, bad)
        placeholder = tokens.clone()
        for i in bad:
            placeholder[:, :, i * g : (i + 1) * g] = 0
        return self.codec.encode(placeholder, bits=bits)

    def append_encoded(self, blocks: QuantizedTensor) -> None:
        """Append blocks that were already quantized with this codec (no re-quantization)."""
        if blocks.bits != self.codec.bits or blocks.group_size != self.codec.group_size:
            raise ValueError(
                f"blocks of {blocks.bits} bits / group {blocks.group_size} cannot be appended to a stream of "
                f"{self.codec.bits} bits / group {self.codec.group_size}"
            )
        bad = unquantizable_blocks(blocks)
        if bad:
            # codes under a NaN/Inf scale mean nothing: loading them would corrupt the history silently
            raise ValueError(
                f"blocks {bad} have non-finite scales or zeros (quantized from NaN/Inf values, or a range that "
                "overflows the scale dtype); they cannot be appended"
            )
        # copies: imported blocks (a store's slices, another process's tensors) may be laid out otherwise, and
        # the fused attention's matmuls would then take other kernels and round differently than on fresh blocks
        tier_start = blocks_of(self.repacked) + blocks_of(self._aged)
        self._recent = append_parts(self._recent, blocks, self.part_blocks, tier_start, copy=True)
        if self.aged_bits is not None:
            self._age()

    def _age(self) -> None:
        """Re-pack the blocks that left the newest ``recent_tokens`` to ``aged_bits``, part by part."""
        keep = self.recent_tokens // self.codec.group_size
        excess = blocks_of(self._recent) - keep
        aged_start = blocks_of(self.repacked)
        while excess > 0:
            part, rest = self._recent[0], self._recent[1:]
            n = part.shape[_BLOCK_DIM]
            take = min(n, excess)
            old = part if take == n else slice_blocks(part, 0, take)
            self._recent = rest if take == n else [slice_blocks(part, take, n), *rest]
            # The one re-quantization mixed precision allows: INT8 -> aged bits, once per block.
            first = aged_start + blocks_of(self._aged)
            tokens = dequantize(old).flatten(2, 3)
            # a range that fits INT8's scale can still overflow the coarser tier's; that block stays exact
            repacked = self._encode_or_keep(tokens, first_block=first, bits=self.aged_bits)
            self._aged = append_parts(self._aged, repacked, self.part_blocks, aged_start)
            excess -= take

    def dequantize_into(self, out: torch.Tensor) -> None:
        """Write all blocks, oldest first, into ``out`` of shape [B, H, num_tokens, D]."""
        start = 0
        for tier in self.tiers:
            length = tier.shape[_BLOCK_DIM] * self.codec.group_size
            _dequantize_into(tier, out[:, :, start : start + length])
            start += length
        g = self.codec.group_size
        for index, block in self.full_precision_blocks.items():
            out[:, :, index * g : (index + 1) * g] = block

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
        first_dropped = self.num_blocks - n_drop
        exact_head = self.full_precision_blocks.get(first_dropped)
        self.full_precision_blocks = {i: t for i, t in self.full_precision_blocks.items() if i < first_dropped}
        dropped = []
        kept = self.tiers
        while kept and n_drop:
            tier = kept.pop()
            n = tier.shape[_BLOCK_DIM]
            take = min(n, n_drop)
            dropped.insert(0, slice_blocks(tier, n - take, n))
            if take < n:
                kept.append(slice_blocks(tier, 0, n - take))
            n_drop -= take
        if n_drop:
            raise ValueError(f"cannot drop {count} tokens from {self.num_tokens + count} quantized tokens")
        self.replace_tiers(kept)
        if exact_head is not None:
            return exact_head[:, :, :kept_tokens].to(dtype).clone()
        head = dequantize(dropped[0], dtype).flatten(2, 3)[:, :, :kept_tokens]
        return head.clone()

    def drop_oldest(self, count: int) -> None:
        """Remove the oldest ``count`` blocks (a budget dropping middle tokens); later blocks keep their order."""
        kept, left = [], count
        for tier in self.tiers:
            n = tier.shape[_BLOCK_DIM]
            take = min(n, left)
            left -= take
            if take < n:
                kept.append(slice_blocks(tier, take, n) if take else tier)
        if left:
            raise ValueError(f"cannot drop {count} blocks from {self.num_blocks} quantized blocks")
        self.full_precision_blocks = {i - count: t for i, t in self.full_precision_blocks.items() if i >= count}
        self.replace_tiers(kept)

    def take_blocks(self, start: int, end: int) -> QuantizedTensor:
        """Blocks [start, end) of a single-tier stream, as stored (for export)."""
        if self._aged or self.repacked:
            raise ValueError("exporting blocks of a stream with aged or re-packed blocks is not supported")
        exact = sorted(i for i in self.full_precision_blocks if start <= i < end)
        if exact:
            raise ValueError(
                f"blocks {exact} hold values that could not be quantized (NaN/Inf or out of the scale range) and "
                "are kept in full precision; they cannot be exported as quantized blocks"
            )
        return take_from_parts(self._recent, start, end)

    def map_tensors(self, fn) -> None:
        """Apply ``fn`` to every stored tensor (batch reorder / selection, device moves)."""
        self._aged = [part.map_tensors(fn) for part in self._aged]
        self._recent = [part.map_tensors(fn) for part in self._recent]
        self.repacked = [tier.map_tensors(fn) for tier in self.repacked]
        self._full_precision_blocks = {i: fn(t) for i, t in self._full_precision_blocks.items()}

    # ------------------------------------------------------------------ snapshot state (plain tensors and numbers)
    def snapshot_state(self) -> dict[str, Any]:
        aged, recent = self.aged, self.recent
        return {
            "aged": None if aged is None else aged.to_dict(),
            "recent": None if recent is None else recent.to_dict(),
            "repacked": [tier.to_dict() for tier in self.repacked],
            "full_precision_blocks": dict(self.full_precision_blocks),
            "fallback_events": self.fallback_events,
        }

    def restore_snapshot_state(self, state: dict[str, Any], device: torch.device) -> None:
        """Inverse of ``snapshot_state``; checks the tiers against this stream's codec."""
        tiers = {name: state[name] and QuantizedTensor.from_dict(state[name], device) for name in ("aged", "recent")}
        for name, tier in tiers.items():
            bits = self.aged_bits if name == "aged" else self.codec.bits
            expected = (bits, self.codec.group_size, self.codec.quant_axis)
            if tier is not None and (tier.bits, tier.group_size, tier.axis) != expected:
                raise ValueError(
                    f"{name} blocks of (bits, group, axis) = {(tier.bits, tier.group_size, tier.axis)} do not match "
                    f"the codec's {expected}"
                )
        repacked = [QuantizedTensor.from_dict(tier, device) for tier in state.get("repacked", [])]
        for tier in repacked:
            if (tier.group_size, tier.axis) != (self.codec.group_size, self.codec.quant_axis):
                raise ValueError(
                    f"re-packed blocks of (group, axis) = {(tier.group_size, tier.axis)} do not match the codec's "
                    f"{(self.codec.group_size, self.codec.quant_axis)}"
                )
        self.repacked = repacked
        self._aged = [] if tiers["aged"] is None else self._as_parts([tiers["aged"]], blocks_of(repacked))
        self._recent = [] if tiers["recent"] is None else self._as_parts(
            [tiers["recent"]], blocks_of(repacked) + blocks_of(self._aged))
        self.full_precision_blocks = {int(i): t.to(device) for i, t in state["full_precision_blocks"].items()}
        self.fallback_events = int(state["fallback_events"])
        if any(not 0 <= i < self.num_blocks for i in self.full_precision_blocks):
            raise ValueError(
                f"full-precision block indices {sorted(self.full_precision_blocks)} exceed {self.num_blocks} blocks"
            )
