"""``EntryLayout``: what every stored chunk of one model + cache settings looks like, and one check against it.

An entry that comes from outside this process (a peer's migration batch) is
stored and later loaded into a cache as it is, so anything it gets wrong
changes what the model attends to: a layer missing, another head count or
head_dim, other bits or group size, a wrong dtype, packed codes or scales of
a shape other than its logical ``shape`` says, a token count other than the
chunk size, non-finite scales. ``EntryLayout.for_model`` builds the reference
once, by encoding a chunk of zeros with each layer's own codec (exactly what
the hook stores, ``chunk_codec.encode_blocks``), and ``problem(entry)`` says
what differs, or None. Every field is compared, so an entry that passes has
the exact tensor layout of one this process would have made itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..blocks import unquantizable_blocks
from ..cache import QuantizedKVCache
from ..config import CacheConfig
from ..layer import QuantizedKVLayer
from ..quantization import QuantizedTensor
from .chunk_codec import encode_blocks

__all__ = ["BlockLayout", "EntryLayout"]

_KEY_BYTES = 32  # chunk keys are 32-byte BLAKE2b digests (prefix_store)


def _tensor_layout(t: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    return None if t is None else (tuple(t.shape), t.dtype)


@dataclass(frozen=True)
class BlockLayout:
    """Everything about one layer's key (or value) blocks of a chunk except the numbers in them."""

    bits: int
    group_size: int
    axis: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    data: tuple[tuple[int, ...], torch.dtype]
    scale: tuple[tuple[int, ...], torch.dtype]
    zero: tuple[tuple[int, ...], torch.dtype] | None

    @classmethod
    def of(cls, q: QuantizedTensor) -> "BlockLayout":
        return cls(q.bits, q.group_size, q.axis, tuple(q.shape), q.dtype, _tensor_layout(q.data),
                   _tensor_layout(q.scale), _tensor_layout(q.zero))

    def problem(self, q: Any) -> str | None:
        if not isinstance(q, QuantizedTensor):
            return f"holds a {type(q).__name__}, not quantized blocks"
        for name in ("data", "scale", "zero"):
            t = getattr(q, name)
            if t is not None and not isinstance(t, torch.Tensor):
                return f"`{name}` is a {type(t).__name__}, not a tensor"
        got = BlockLayout.of(q)
        for name in ("bits", "group_size", "axis", "shape", "dtype", "data", "scale", "zero"):
            if getattr(got, name) != getattr(self, name):
                return f"`{name}` is {getattr(got, name)} but this cache stores {getattr(self, name)}"
        if unquantizable_blocks(q):
            return "has non-finite scales or zeros"
        return None


@dataclass(frozen=True)
class EntryLayout:
    """The layout of every chunk a prefix store of this model and these cache settings holds."""

    chunk_size: int
    keys: tuple[BlockLayout, ...]
    values: tuple[BlockLayout, ...]

    @classmethod
    def for_model(
        cls, model_config: Any, cache_config: CacheConfig, chunk_size: int, dtype: torch.dtype
    ) -> "EntryLayout":
        """Encode a chunk of zeros with each layer's codec, as the hook encodes the chunks it stores."""
        cache = QuantizedKVCache(model_config, cache_config=cache_config)
        keys, values = [], []
        for idx, layer in enumerate(cache.layers):
            if not isinstance(layer, QuantizedKVLayer):
                raise ValueError(f"layer {idx} is not a quantized layer; prefix entries need every layer quantized")
            heads, head_dim = layer.settings.expected_num_heads, layer.settings.expected_head_dim
            if heads is None or head_dim is None:
                raise ValueError("the model config names no key/value head count or head_dim")
            zeros = torch.zeros(1, heads, chunk_size, head_dim, dtype=dtype)
            layer.lazy_initialization(zeros, zeros)
            k, v = encode_blocks(layer, zeros, zeros)
            keys.append(BlockLayout.of(k))
            values.append(BlockLayout.of(v))
        return cls(chunk_size, tuple(keys), tuple(values))

    def problem(self, entry: Any) -> str | None:
        """What makes ``entry`` (a ``PrefixEntry``) unlike the chunks of this layout, or None."""
        key, parent = getattr(entry, "key", None), getattr(entry, "parent", None)
        if not isinstance(key, bytes) or len(key) != _KEY_BYTES:
            return f"its key has to be {_KEY_BYTES} bytes but got {key!r:.80}"
        if parent is not None and (not isinstance(parent, bytes) or len(parent) != _KEY_BYTES):
            return f"its parent has to be None or {_KEY_BYTES} bytes but got {parent!r:.80}"
        name = key.hex()[:12]
        if getattr(entry, "num_tokens", None) != self.chunk_size:
            return f"entry {name}: holds {getattr(entry, 'num_tokens', None)!r} tokens, not {self.chunk_size}"
        for stream, layouts in (("keys", self.keys), ("values", self.values)):
            blocks = getattr(entry, stream, None)
            if not isinstance(blocks, tuple) or len(blocks) != len(layouts):
                count = len(blocks) if isinstance(blocks, tuple) else type(blocks).__name__
                return f"entry {name}: {stream} of {count} layers, this model has {len(layouts)}"
            for layer, (q, layout) in enumerate(zip(blocks, layouts)):
                problem = layout.problem(q)
                if problem is not None:
                    return f"entry {name}: layer {layer} {stream} {problem}"
        return None
