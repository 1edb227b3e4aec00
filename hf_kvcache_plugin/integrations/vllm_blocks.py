"""vLLM's paged CPU KV buffer read token by token, and one chunk's KV encoded for the prefix store.

vLLM's CPU attention keeps each layer's KV as ``[num_blocks, num_kv_heads,
block_size, 2 * head_size]``, but the last two dims are only a size: the
kernel views each (block, head) slab as a key area followed by a value area,
and lays tokens out inside each area as its ISA wants (``vec`` stores keys
transposed, ``[head_size, block_size]``). Rather than hard-code that, the
layout is *probed* once with vLLM's own write op (``BlockLayout.probe``):
token and channel numbers are written and read back, which yields, for every
(token, channel), its position in the slab. Loads go through the same op, so
they are right for any ISA by construction.

A chunk is stored in our KIVI layout: keys quantized per channel (groups of
G tokens), values per token (groups of G channels), each with its own codec;
``FullPrecisionTensor`` keeps the exact tensors instead (the full-precision
tier the benchmark compares against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import CacheConfig
from ..layer import LayerSettings
from ..quantization import QuantizedTensor, dequantize
from ..reuse.entry_layout import BlockLayout as StoredBlockLayout
from ..reuse.entry_layout import EntryLayout

__all__ = ["BlockLayout", "ChunkCodec", "FullPrecisionTensor"]

# write(key [T, H, D], value [T, H, D], key_cache, value_cache, slot_mapping int64 [T])
WriteOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def split_kv(kv_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value areas of one layer's buffer, as vLLM's CPU backend views them."""
    num_blocks, num_kv_heads, block_size, _ = kv_layer.shape
    return kv_layer.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)


@dataclass(frozen=True)
class BlockLayout:
    """Where token t, channel d of the keys / values sits in a (block, head) slab of ``2 * B * D`` elements."""

    block_size: int
    head_size: int
    key_positions: torch.Tensor  # int64 [B * D], token-major
    value_positions: torch.Tensor

    @classmethod
    def probe(cls, write: WriteOp, block_size: int, head_size: int, dtype: torch.dtype) -> "BlockLayout":
        """Learn the layout by writing token and channel numbers with ``write`` into a one-block buffer."""
        largest = max(block_size, head_size) - 1
        if torch.tensor(float(largest), dtype=dtype).item() != largest:
            raise ValueError(
                f"cannot probe vLLM's KV layout in {dtype}: block_size {block_size} and head_size {head_size} "
                f"need integers up to {largest} to be exact"
            )
        b, d = block_size, head_size
        tokens = torch.arange(b, dtype=dtype)[:, None, None].expand(b, 1, d)
        channels = torch.arange(d, dtype=dtype)[None, None, :].expand(b, 1, d)
        marker = torch.full((b, 1, d), -2.0, dtype=dtype)

        def written(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            buffer = torch.full((1, 1, b, 2 * d), -1.0, dtype=dtype)
            key_cache, value_cache = split_kv(buffer)
            write(key.contiguous(), value.contiguous(), key_cache, value_cache, torch.arange(b, dtype=torch.int64))
            return buffer.reshape(-1)

        def positions(token_slab: torch.Tensor, channel_slab: torch.Tensor) -> torch.Tensor:
            where = (token_slab >= 0).nonzero().flatten()
            index = torch.full((b, d), -1, dtype=torch.int64)
            index[token_slab[where].long(), channel_slab[where].long()] = where
            if where.numel() != b * d or (index < 0).any():
                raise RuntimeError(f"vLLM's KV write op did not place {b}x{d} distinct elements; cannot read its layout")
            return index.flatten()

        keys = positions(written(tokens, marker), written(channels, marker))
        values = positions(written(marker, tokens), written(marker, channels))
        return cls(block_size, head_size, keys, values)

    def read(self, kv_layer: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``block_ids`` as ``[H, n * B, D]`` (token order), copied out."""
        num_blocks, heads, block_size, width = kv_layer.shape
        if block_size != self.block_size or width != 2 * self.head_size:
            raise ValueError(
                f"this layout is for blocks of {self.block_size} tokens x head_size {self.head_size} but the buffer "
                f"is {tuple(kv_layer.shape)}"
            )
        slabs = kv_layer.view(num_blocks, heads, -1)[block_ids]  # [n, H, 2*B*D]

        def tokens(positions: torch.Tensor) -> torch.Tensor:
            picked = slabs[:, :, positions].view(len(block_ids), heads, block_size, self.head_size)
            return picked.transpose(0, 1).reshape(heads, -1, self.head_size)

        return tokens(self.key_positions), tokens(self.value_positions)


@dataclass(frozen=True)
class FullPrecisionTensor:
    """A chunk's exact K or V in the store's block shape ``[1, H, 1, C, D]`` (what a full-precision tier holds)."""

    data: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor], new_shape=None) -> "FullPrecisionTensor":
        return FullPrecisionTensor(fn(self.data))


class ChunkCodec:
    """Encodes one layer's chunk ``[H, C, D]`` for the store and decodes it back.

    Quantized: the layer's codecs of ``cache_config`` (resolved group size,
    per-layer overrides applied), keys and values each with their own.
    ``cache_config=None``: full precision.
    """

    def __init__(self, cache_config: CacheConfig | None, num_layers: int):
        self.cache_config = cache_config
        self._codecs = (
            None
            if cache_config is None
            else [
                tuple(LayerSettings.for_layer(cache_config, i).blocks(stream).codec for stream in ("keys", "values"))
                for i in range(num_layers)
            ]
        )

    def encode(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        if self._codecs is None:
            return tuple(FullPrecisionTensor(t[None, :, None].clone()) for t in (keys, values))
        key_codec, value_codec = self._codecs[layer]
        return key_codec.encode(keys[None]), value_codec.encode(values[None])

    def entry_layout(self, heads: int, chunk_size: int, head_size: int, dtype: torch.dtype) -> EntryLayout:
        """What every chunk this codec stores looks like (a chunk of zeros encoded per layer): the check a
        peer instance's entry has to pass. Quantized tiers only."""
        if self._codecs is None:
            raise ValueError("the full-precision tier has no quantized entry layout")
        zeros = torch.zeros(heads, chunk_size, head_size, dtype=dtype)
        encoded = [self.encode(i, zeros, zeros) for i in range(len(self._codecs))]
        return EntryLayout(
            chunk_size,
            tuple(StoredBlockLayout.of(k) for k, _ in encoded),
            tuple(StoredBlockLayout.of(v) for _, v in encoded),
        )

    @staticmethod
    def decode(stored: QuantizedTensor | FullPrecisionTensor, dtype: torch.dtype) -> torch.Tensor:
        """``[H, C, D]`` in ``dtype``."""
        blocks = stored.data if isinstance(stored, FullPrecisionTensor) else dequantize(stored, dtype)
        _, heads, n, group, head_size = blocks.shape
        return blocks.to(dtype).reshape(heads, n * group, head_size)
