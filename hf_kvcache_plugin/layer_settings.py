"""``LayerSettings``: how one layer quantizes, resolved from a ``CacheConfig``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import BlockCodec, QuantizedBlocks
from .config import MIXED_AGED_BITS, CacheConfig

__all__ = ["LayerSettings"]

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "compute": None}

_DEFAULTS = CacheConfig()  # a layer built by keywords defaults as a cache does


@dataclass(frozen=True)
class LayerSettings:
    """How one layer quantizes: ``CacheConfig`` resolved for one layer index (``for_layer``)."""

    key_bits: int
    value_bits: int
    group_size: int
    residual_length: int
    sink_tokens: int = _DEFAULTS.sink_tokens
    key_axis: str = _DEFAULTS.key_axis
    value_axis: str = _DEFAULTS.value_axis
    symmetric: bool = _DEFAULTS.symmetric
    scale_dtype: str = _DEFAULTS.scale_dtype
    clip_percentile: float | None = _DEFAULTS.clip_percentile
    aged_bits: int | None = None  # mixed precision: blocks older than `recent_tokens` are re-packed to this
    recent_tokens: int = 0
    layer_idx: int | None = None
    expected_num_heads: int | None = None  # None: whatever the first tensors have
    expected_head_dim: int | None = None

    @classmethod
    def for_layer(
        cls, config: CacheConfig, idx: int, num_heads: int | None = None, head_dim: int | None = None
    ) -> "LayerSettings":
        """Layer ``idx`` of a cache made with ``config`` (group size resolved), its overrides applied."""
        if config.group_size is None:
            raise ValueError("`group_size` is unresolved; call `CacheConfig.for_model` first")
        override = config.layer_overrides.get(idx)
        mixed = config.quant_type == "mixed"
        return cls(
            key_bits=(override and override.key_bits) or config.resolved_key_bits,
            value_bits=(override and override.value_bits) or config.resolved_value_bits,
            group_size=config.group_size,
            residual_length=config.residual_length,
            sink_tokens=config.sink_tokens,
            key_axis=config.key_axis,
            value_axis=config.value_axis,
            symmetric=config.symmetric,
            scale_dtype=config.scale_dtype,
            clip_percentile=config.clip_percentile,
            aged_bits=MIXED_AGED_BITS if mixed else None,
            recent_tokens=config.mixed_int8_tokens if mixed else 0,
            layer_idx=idx,
            expected_num_heads=num_heads,
            expected_head_dim=head_dim,
        )

    def check_shape(self, name: str, heads: int, head_dim: int, value_head_dim: int) -> None:
        """Key/value states of ``heads`` heads and these head dims fit this layer: the model config's shape (when
        known), and whole groups of channels for a stream grouped per token."""
        if self.expected_num_heads is not None and heads != self.expected_num_heads:
            raise ValueError(
                f"{name}: key/value states have {heads} heads but the model config has "
                f"{self.expected_num_heads} key/value heads"
            )
        if self.expected_head_dim is not None and head_dim != self.expected_head_dim:
            raise ValueError(
                f"{name}: key states have head_dim {head_dim} but the model config has head_dim "
                f"{self.expected_head_dim}"
            )
        for stream, axis, dim in (("keys", self.key_axis, head_dim), ("values", self.value_axis, value_head_dim)):
            if axis == "token" and dim % self.group_size != 0:
                raise ValueError(
                    f"{name}: `group_size` ({self.group_size}) has to divide head_dim ({dim}) to group "
                    f"{stream} per token"
                )

    def codec(self, stream: str) -> BlockCodec:
        """How this layer quantizes ``stream`` (``"keys"`` or ``"values"``)."""
        bits, axis = (self.key_bits, self.key_axis) if stream == "keys" else (self.value_bits, self.value_axis)
        return BlockCodec(
            bits, self.group_size, axis, self.symmetric, _SCALE_DTYPES[self.scale_dtype], self.clip_percentile
        )

    def blocks(self, stream: str) -> QuantizedBlocks:
        """An empty block list for ``stream`` (``"keys"`` or ``"values"``) with this layer's codec."""
        return QuantizedBlocks(self.codec(stream), aged_bits=self.aged_bits, recent_tokens=self.recent_tokens)
