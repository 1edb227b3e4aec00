"""``QuantizedKVCache``: a ``transformers.Cache`` whose layers keep K/V quantized.

Per layer, tokens live in three places, in order:

    [ sinks (full precision) | quantized blocks (append-only) | residual window (full precision) ]

``update`` appends new tokens to the sinks until ``sink_tokens`` are held, then
to the residual window. Once the window holds at least ``residual_length + G``
tokens, its oldest whole blocks of G tokens are quantized and appended; the
newest ``residual_length`` tokens always stay exact. The first ``update``
(prefill) returns its inputs unchanged; later ones return sinks + dequantized
blocks + residual, in the compute dtype, on the inputs' device.

A block that cannot be quantized (NaN/Inf, or a range that overflows the
scale dtype) stays in full precision at its place in the history and is
counted (``fallback_blocks`` / ``fallback_events`` in ``get_stats``); the
cache keeps serving. ``save(path)`` / ``QuantizedKVCache.load(path)`` write
and read a checksummed snapshot that is refused whole if it is damaged.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DummyLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    get_layer_types_and_kwargs,
)

from .attention import FUSED_STATE_KEY, QUANTIZED_ATTENTION, register_quantized_attention
from .blocks import BlockCodec, QuantizedBlocks, dtype_from_name, dtype_name
from .config import MIXED_AGED_BITS, CacheConfig, PluginConfig, parse_config
from .quantization import QuantizedTensor
from .snapshot import SnapshotError, read_snapshot, write_snapshot

__all__ = ["QuantizedKVLayer", "QuantizedKVCache", "create_quantized_kv_cache"]

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "compute": None}
_SLIDING_TYPES = ("sliding_attention", "chunked_attention")
_SNAPSHOT_KIND = "QuantizedKVCache"

logger = logging.getLogger(__name__)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class QuantizedKVLayer(CacheLayerMixin):
    """One attention layer's quantized cache (see the module docstring for the layout)."""

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(
        self,
        key_bits: int,
        value_bits: int,
        group_size: int,
        residual_length: int,
        sink_tokens: int = 0,
        key_axis: str = "channel",
        value_axis: str = "token",
        symmetric: bool = False,
        scale_dtype: str = "float16",
        clip_percentile: float | None = None,
        aged_bits: int | None = None,
        recent_tokens: int = 0,
        layer_idx: int | None = None,
        expected_num_heads: int | None = None,
        expected_head_dim: int | None = None,
    ):
        super().__init__()
        self.key_bits, self.value_bits = key_bits, value_bits
        self.group_size = group_size
        self.residual_length = residual_length
        self.sink_tokens = sink_tokens
        self.key_axis, self.value_axis = key_axis, value_axis
        self.symmetric = symmetric
        self.scale_dtype = scale_dtype
        self.clip_percentile = clip_percentile
        self.aged_bits = aged_bits
        self.recent_tokens = recent_tokens
        self.layer_idx = layer_idx
        self.expected_num_heads = expected_num_heads
        self.expected_head_dim = expected_head_dim
        self._clear()

    # ------------------------------------------------------------------ state
    def _clear(self) -> None:
        self.is_initialized = False
        self.keys = self.values = None  # unused by this layer; kept for the mixin's contract
        self.sink_keys = self.sink_values = None
        self.residual_keys = self.residual_values = None
        self.quantized_keys: QuantizedBlocks | None = None
        self.quantized_values: QuantizedBlocks | None = None
        self._length = 0
        self._pending_flush = False

    def _name(self) -> str:
        return f"layer {self.layer_idx}" if self.layer_idx is not None else "this layer"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._check_rank(key_states, value_states)
        b, h, _, d = key_states.shape
        dv = value_states.shape[-1]
        if self.expected_num_heads is not None and h != self.expected_num_heads:
            raise ValueError(
                f"{self._name()}: key/value states have {h} heads but the model config has "
                f"{self.expected_num_heads} key/value heads"
            )
        if self.expected_head_dim is not None and d != self.expected_head_dim:
            raise ValueError(
                f"{self._name()}: key states have head_dim {d} but the model config has head_dim {self.expected_head_dim}"
            )
        for name, axis, dim in (("keys", self.key_axis, d), ("values", self.value_axis, dv)):
            if axis == "token" and dim % self.group_size != 0:
                raise ValueError(
                    f"{self._name()}: `group_size` ({self.group_size}) has to divide head_dim ({dim}) to group "
                    f"{name} per token"
                )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, self.head_dim, self.value_head_dim = b, h, d, dv
        scale_dtype = _SCALE_DTYPES[self.scale_dtype]
        self.quantized_keys = QuantizedBlocks(
            BlockCodec(self.key_bits, self.group_size, self.key_axis, self.symmetric, scale_dtype, self.clip_percentile),
            aged_bits=self.aged_bits,
            recent_tokens=self.recent_tokens,
        )
        self.quantized_values = QuantizedBlocks(
            BlockCodec(
                self.value_bits, self.group_size, self.value_axis, self.symmetric, scale_dtype, self.clip_percentile
            ),
            aged_bits=self.aged_bits,
            recent_tokens=self.recent_tokens,
        )
        self.sink_keys = key_states.new_empty(b, h, 0, d)
        self.sink_values = value_states.new_empty(b, h, 0, dv)
        self.residual_keys = key_states.new_empty(b, h, 0, d)
        self.residual_values = value_states.new_empty(b, h, 0, dv)
        self.is_initialized = True

    def _check_rank(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"{self._name()}: `{name}` has to be a 4-d tensor [batch, num_kv_heads, seq_len, head_dim] "
                    f"but got shape {shape}"
                )
            if not t.is_floating_point():
                raise ValueError(f"{self._name()}: `{name}` has to be floating point but got dtype {t.dtype}")
        if key_states.shape[:3] != value_states.shape[:3]:
            raise ValueError(
                f"{self._name()}: key_states {tuple(key_states.shape)} and value_states {tuple(value_states.shape)} "
                "differ in batch, heads or seq_len"
            )

    def _check_against_state(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._check_rank(key_states, value_states)
        b, h, _, d = key_states.shape
        expected = (self.batch_size, self.num_heads, self.head_dim, self.value_head_dim)
        if (b, h, d, value_states.shape[-1]) != expected:
            raise ValueError(
                f"{self._name()}: got key/value states with (batch, heads, head_dim, value head_dim) = "
                f"{(b, h, d, value_states.shape[-1])} but this cache holds {expected}"
            )
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise ValueError(
                f"{self._name()}: got key/value states of dtype {key_states.dtype}/{value_states.dtype} but this "
                f"cache holds {self.dtype}"
            )

    # ------------------------------------------------------------------ update
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            self._check_against_state(key_states, value_states)
        had_history = self._length > 0
        self._append(key_states, value_states)
        if had_history:
            keys_out, values_out = self._materialize()
        else:
            # Prefill: everything is in the inputs, returned exact.
            keys_out = torch.cat([self.sink_keys, self.residual_keys], dim=-2)
            values_out = torch.cat([self.sink_values, self.residual_values], dim=-2)
        self._flush_full_blocks()
        return keys_out, values_out

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New tokens fill the sinks first, then the residual window."""
        self._finish_pending_flush()
        self._length += key_states.shape[-2]
        n_sink = min(key_states.shape[-2], self.sink_tokens - self.sink_keys.shape[-2])
        if n_sink > 0:
            self.sink_keys = torch.cat([self.sink_keys, key_states[:, :, :n_sink]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[:, :, :n_sink]], dim=-2)
            key_states, value_states = key_states[:, :, n_sink:], value_states[:, :, n_sink:]
        self.residual_keys = torch.cat([self.residual_keys, key_states], dim=-2)
        self.residual_values = torch.cat([self.residual_values, value_states], dim=-2)

    # ------------------------------------------------------------------ fused attention
    def update_for_fused_attention(
        self, key_states: torch.Tensor, value_states: torch.Tensor, attention_kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append without materialising the history; the layer itself goes to the attention
        function through ``attention_kwargs`` (see ``attention.py``). Prefill stays exact and
        takes the standard path. Full blocks are flushed once attention has read this step's
        window (``finish_fused_step``), so both paths see the same exact tokens."""
        if not self.is_initialized or self._length == 0:
            return self.update(key_states, value_states)
        self._check_against_state(key_states, value_states)
        self._append(key_states, value_states)
        self._pending_flush = True
        attention_kwargs[FUSED_STATE_KEY] = self
        return key_states, value_states

    def finish_fused_step(self) -> None:
        self._finish_pending_flush()

    def _finish_pending_flush(self) -> None:
        if self._pending_flush:
            self._pending_flush = False
            self._flush_full_blocks()

    def attention_segments(self) -> list[tuple[Any, Any, int]]:
        """(keys, values, n_tokens) oldest first: dense tensors or aligned QuantizedTensor tiers."""
        segments = []
        if self.sink_keys.shape[-2]:
            segments.append((self.sink_keys, self.sink_values, self.sink_keys.shape[-2]))
        if self.quantized_keys.full_precision_blocks or self.quantized_values.full_precision_blocks:
            # A block kept exact after NaN/Inf leaves placeholder codes in its tier; such histories are
            # rare, so they are read dequantized (exact blocks in place) rather than block by block.
            if self.quantized_keys.num_blocks:
                dtype = self.residual_keys.dtype
                segments.append((
                    self.quantized_keys.dequantize(dtype),
                    self.quantized_values.dequantize(dtype),
                    self.quantized_keys.num_tokens,
                ))
        else:
            for k_tier, v_tier in zip(self.quantized_keys.tiers, self.quantized_values.tiers):
                segments.append((k_tier, v_tier, k_tier.shape[2] * self.group_size))
        if self.residual_keys.shape[-2]:
            segments.append((self.residual_keys, self.residual_values, self.residual_keys.shape[-2]))
        return segments

    def _materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[sinks | dequantized blocks | residual] for keys and values, one allocation each."""
        outs = []
        for sink, blocks, residual in (
            (self.sink_keys, self.quantized_keys, self.residual_keys),
            (self.sink_values, self.quantized_values, self.residual_values),
        ):
            s, q, r = sink.shape[-2], blocks.num_tokens, residual.shape[-2]
            out = residual.new_empty(residual.shape[0], residual.shape[1], s + q + r, residual.shape[-1])
            out[:, :, :s] = sink
            if q:
                blocks.dequantize_into(out[:, :, s : s + q])
            out[:, :, s + q :] = residual
            outs.append(out)
        return outs[0], outs[1]

    def _flush_full_blocks(self) -> None:
        excess = self.residual_keys.shape[-2] - self.residual_length
        n_tokens = (excess // self.group_size) * self.group_size
        if n_tokens <= 0:
            return
        events = self.fallback_events
        self.quantized_keys.append(self.residual_keys[:, :, :n_tokens])
        self.quantized_values.append(self.residual_values[:, :, :n_tokens])
        if self.fallback_events > events:
            logger.warning(
                "%s: %d block(s) could not be quantized (NaN/Inf or out of the scale range); kept in full precision",
                self._name(), self.fallback_events - events,
            )
        # clone: a slice would keep the whole old window alive
        self.residual_keys = self.residual_keys[:, :, n_tokens:].clone()
        self.residual_values = self.residual_values[:, :, n_tokens:].clone()

    def flush_residual(self) -> None:
        """Quantize every whole block of G tokens in the residual window now, leaving fewer than G exact.

        After a prefill of h tokens (h a multiple of G) this gives the layout a
        prefix-store hit of those h tokens loads: all h as blocks, the same
        bytes (the same codec on the same exact K/V, block-aligned). Used to
        build the reference that reuse is compared with bit for bit.
        """
        if not self.is_initialized:
            return
        self._finish_pending_flush()
        keep = self.residual_length
        self.residual_length = 0
        try:
            self._flush_full_blocks()
        finally:
            self.residual_length = keep

    # ------------------------------------------------------------------ queries
    def get_seq_length(self) -> int:
        return self._length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._length + query_length, 0

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached keys and values as dense tensors in the compute dtype."""
        if not self.is_initialized:
            raise ValueError(f"{self._name()} holds no tokens yet")
        return self._materialize()

    @property
    def fallback_events(self) -> int:
        """Blocks of keys or values that could not be quantized so far (kept in full precision)."""
        if not self.is_initialized:
            return 0
        return self.quantized_keys.fallback_events + self.quantized_values.fallback_events

    def stats(self) -> dict[str, int]:
        if not self.is_initialized:
            return dict.fromkeys(_EMPTY_LAYER_STATS, 0)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        streams = (self.quantized_keys, self.quantized_values)
        fallback_bytes = sum(s.full_precision_nbytes for s in streams)
        return {
            "seq_length": self._length,
            "quantized_bytes": sum(s.nbytes for s in streams) - fallback_bytes,
            "residual_bytes": _nbytes(self.residual_keys) + _nbytes(self.residual_values),
            "sink_bytes": _nbytes(self.sink_keys) + _nbytes(self.sink_values),
            "fallback_bytes": fallback_bytes,
            "fallback_blocks": sum(len(s.full_precision_blocks) for s in streams),
            "fallback_events": self.fallback_events,
            "fp_bytes": self.batch_size * self.num_heads * self._length * (self.head_dim + self.value_head_dim) * itemsize,
        }

    # ------------------------------------------------------------------ edits
    def crop(self, tokens_to_remove: int) -> None:
        """Remove ``-tokens_to_remove`` tokens from the end (``transformers``' convention: n <= 0)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"`crop` takes the number of tokens to remove as a negative integer but got {tokens_to_remove}"
            )
        count = -tokens_to_remove
        if count == 0 or not self.is_initialized:
            return
        if count > self._length:
            raise ValueError(f"{self._name()}: cannot crop {count} tokens, the cache holds only {self._length}")
        self._length -= count
        r = self.residual_keys.shape[-2]
        from_residual = min(count, r)
        self.residual_keys = self.residual_keys[:, :, : r - from_residual].clone()
        self.residual_values = self.residual_values[:, :, : r - from_residual].clone()
        count -= from_residual
        if count == 0:
            return
        q = self.quantized_keys.num_tokens
        from_blocks = min(count, q)
        if from_blocks:
            # the kept head of a partly cropped block rejoins the (now empty) residual window
            self.residual_keys = self.quantized_keys.drop_last_tokens(from_blocks, self.dtype)
            self.residual_values = self.quantized_values.drop_last_tokens(from_blocks, self.dtype)
        count -= from_blocks
        if count:
            s = self.sink_keys.shape[-2]
            self.sink_keys = self.sink_keys[:, :, : s - count].clone()
            self.sink_values = self.sink_values[:, :, : s - count].clone()

    def _map_all(self, fn) -> None:
        for name in ("sink_keys", "sink_values", "residual_keys", "residual_values"):
            setattr(self, name, fn(getattr(self, name)))
        self.quantized_keys.map_tensors(fn)
        self.quantized_values.map_tensors(fn)
        self.batch_size = self.residual_keys.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            self._map_all(lambda t: t.index_select(0, idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_all(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_all(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        if self.is_initialized:
            self._map_all(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.residual_keys.device != self.device:
            self._map_all(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self._clear()

    # ------------------------------------------------------------------ prefix reuse: whole-block export / import
    # A prefix store keeps quantized blocks, never tokens. These two methods are the
    # only way blocks leave or enter a layer, so a reused prefix is never re-quantized.

    def encode_blocks(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[QuantizedTensor, QuantizedTensor]:
        """Quantize exact K/V [B, H, n*G, D] with this layer's codecs into blocks [B, H, n, G, D].

        These are the bytes the layer itself stores when those tokens leave its
        residual window as whole blocks (same codec, same block alignment).
        """
        if not self.is_initialized:
            raise ValueError(f"{self._name()} has no codecs until it has seen its first tensors")
        self._check_rank(key_states, value_states)
        # any batch (e.g. one prompt of the cached batch); heads, head_dim and dtype must be the layer's
        got = (key_states.shape[1], key_states.shape[-1], value_states.shape[-1], key_states.dtype, value_states.dtype)
        held = (self.num_heads, self.head_dim, self.value_head_dim, self.dtype, self.dtype)
        if got != held:
            raise ValueError(
                f"{self._name()}: got key/value states with (heads, head_dim, value head_dim, dtypes) = {got} but "
                f"this layer holds {held}"
            )
        if key_states.shape[-2] % self.group_size != 0:
            raise ValueError(
                f"{self._name()}: `encode_blocks` takes whole blocks of {self.group_size} tokens but got "
                f"{key_states.shape[-2]} tokens"
            )
        return self.quantized_keys.codec.encode(key_states), self.quantized_values.codec.encode(value_states)

    def load_blocks(
        self, keys: QuantizedTensor, values: QuantizedTensor, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        """Fill an empty layer with already-quantized blocks [B, H, n, G, D]: they become its history."""
        if self.is_initialized:
            raise ValueError(f"{self._name()} already holds tokens; blocks can only be loaded into an empty layer")
        if self.sink_tokens:
            raise ValueError(
                f"{self._name()}: loading blocks needs `sink_tokens == 0` (sinks precede the blocks in full "
                f"precision) but got {self.sink_tokens}"
            )
        if len(keys.shape) != 5 or keys.shape[:3] != values.shape[:3] or keys.shape[3] != values.shape[3]:
            raise ValueError(
                f"{self._name()}: key blocks {keys.shape} and value blocks {values.shape} have to be "
                "[batch, heads, n_blocks, group_size, head_dim] with the same batch, heads and blocks"
            )
        b, h, n, g, d = keys.shape
        device = torch.device(device)
        self.lazy_initialization(
            torch.empty(b, h, 0, d, dtype=dtype, device=device),
            torch.empty(b, h, 0, values.shape[-1], dtype=dtype, device=device),
        )
        for name, blocks, stream in (("key", keys, self.quantized_keys), ("value", values, self.quantized_values)):
            codec = stream.codec
            scale_dtype = codec.scale_dtype or dtype
            if (blocks.bits, blocks.group_size, blocks.axis, blocks.scale.dtype, blocks.zero is None) != (
                codec.bits, codec.group_size, codec.quant_axis, scale_dtype, codec.symmetric
            ):
                self._clear()
                raise ValueError(
                    f"{self._name()}: {name} blocks ({blocks.bits} bits, group {blocks.group_size}, axis "
                    f"{blocks.axis}, scales {blocks.scale.dtype}, symmetric {blocks.zero is None}) do not match this "
                    f"layer's codec ({codec.bits} bits, group {codec.group_size}, axis {codec.quant_axis}, scales "
                    f"{scale_dtype}, symmetric {codec.symmetric})"
                )
        self.quantized_keys.append_encoded(keys.map_tensors(lambda t: t.to(device)))
        self.quantized_values.append_encoded(values.map_tensors(lambda t: t.to(device)))
        self._length = n * g
    # ------------------------------------------------------------------ snapshot state
    _SETTINGS = (
        "key_bits", "value_bits", "group_size", "residual_length", "sink_tokens", "key_axis", "value_axis",
        "symmetric", "scale_dtype", "clip_percentile", "aged_bits", "recent_tokens", "layer_idx",
        "expected_num_heads", "expected_head_dim",
    )  # fmt: skip

    def snapshot_state(self) -> dict[str, Any]:
        """Settings and every held tensor, as plain tensors and numbers."""
        state: dict[str, Any] = {"settings": {name: getattr(self, name) for name in self._SETTINGS}}
        state["initialized"] = self.is_initialized
        if self.is_initialized:
            state.update(
                dtype=dtype_name(self.dtype),
                length=self._length,
                shape=[self.batch_size, self.num_heads, self.head_dim, self.value_head_dim],
                sink_keys=self.sink_keys, sink_values=self.sink_values,
                residual_keys=self.residual_keys, residual_values=self.residual_values,
                keys=self.quantized_keys.snapshot_state(), values=self.quantized_values.snapshot_state(),
            )  # fmt: skip
        return state

    @classmethod
    def from_snapshot_state(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> "QuantizedKVLayer":
        layer = cls(**state["settings"])
        if not state["initialized"]:
            return layer
        device = torch.device(device)
        dtype = dtype_from_name(state["dtype"])
        b, h, d, dv = state["shape"]
        layer.lazy_initialization(
            torch.empty(b, h, 0, d, dtype=dtype, device=device), torch.empty(b, h, 0, dv, dtype=dtype, device=device)
        )
        for name in ("sink_keys", "sink_values", "residual_keys", "residual_values"):
            setattr(layer, name, state[name].to(device))
        layer.quantized_keys.restore_snapshot_state(state["keys"], device)
        layer.quantized_values.restore_snapshot_state(state["values"], device)
        layer._length = int(state["length"])
        for name, (sink, blocks, residual) in {
            "keys": (layer.sink_keys, layer.quantized_keys, layer.residual_keys),
            "values": (layer.sink_values, layer.quantized_values, layer.residual_values),
        }.items():
            held = sink.shape[-2] + blocks.num_tokens + residual.shape[-2]
            if held != layer._length or sink.shape[:2] != (b, h) or residual.shape[:2] != (b, h):
                raise ValueError(
                    f"{layer._name()}: the saved {name} hold {held} tokens of shape {tuple(residual.shape)} but the "
                    f"layer records {layer._length} tokens of [batch {b}, heads {h}]"
                )
        return layer


_EMPTY_LAYER_STATS = (
    "seq_length", "quantized_bytes", "residual_bytes", "sink_bytes", "fallback_bytes", "fallback_blocks",
    "fallback_events", "fp_bytes",
)  # fmt: skip


def _layer_stats(layer: Any) -> dict[str, int]:
    """Byte accounting for our layers and for the full-precision layers we delegate to."""
    if isinstance(layer, QuantizedKVLayer):
        return layer.stats()
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    held = _nbytes(keys) + _nbytes(values) if getattr(layer, "is_initialized", False) else 0
    seq = layer.get_seq_length() if isinstance(layer, CacheLayerMixin) else 0
    return {**dict.fromkeys(_EMPTY_LAYER_STATS, 0), "seq_length": seq, "residual_bytes": held, "fp_bytes": held}


def _select_fused_attention(config: PretrainedConfig | None) -> None:
    """Make the fused path the default: a model on plain SDPA is switched to ``kvquant_sdpa``.

    ``kvquant_sdpa`` is SDPA for every other cache and for prefill, so the switch
    changes nothing else the model does; eager, flash and custom attention are the
    user's explicit choice and are left alone (``enable_quantized_attention``
    selects it for them). ``attention="dequantize"`` keeps the model untouched.
    """
    decoder = None if config is None else config.get_text_config(decoder=True)
    if getattr(decoder, "_attn_implementation", None) != "sdpa":
        return
    register_quantized_attention()
    # only the decoder's config: a vision tower or encoder of a composite model keeps its attention
    decoder._attn_implementation = QUANTIZED_ATTENTION
    logger.info("QuantizedKVCache: the model now runs %r (SDPA that reads the quantized blocks); "
                "pass attention='dequantize' to keep plain SDPA", QUANTIZED_ATTENTION)


class QuantizedKVCache(Cache):
    """Quantized KV cache for ``model.generate(..., past_key_values=QuantizedKVCache(model.config))``.

    Args:
        config: the model's ``PretrainedConfig`` (its decoder part is used). May be
            ``None`` when ``num_layers`` is given (a model-free cache).
        quant_type: ``int8 | int4 | int2 | mixed``.
        cache_config: a full ``CacheConfig``; exclusive with ``quant_type``/``options``.
        num_layers: number of layers when ``config`` is ``None``.
        **options: any other ``CacheConfig`` field (``group_size``, ``residual_length``,
            ``sink_tokens``, ``key_bits``, ``value_bits``, ``layer_overrides``, ...).

    Full-attention layers are quantized; sliding-window layers keep their bounded
    window in full precision (``DynamicSlidingWindowLayer``); layers listed in
    ``skip_layers`` are plain ``DynamicLayer``s. Other layer kinds (linear
    attention, ...) are refused with an error naming the layer.
    """

    def __init__(
        self,
        config: PretrainedConfig | None = None,
        quant_type: str | None = None,
        *,
        cache_config: CacheConfig | None = None,
        num_layers: int | None = None,
        **options: Any,
    ):
        if cache_config is not None and (quant_type is not None or options):
            raise ValueError("pass either `cache_config` or `quant_type`/options, not both")
        if cache_config is None:
            cache_config = CacheConfig(quant_type=quant_type or "int4", **options)
        layer_types, layer_kwargs, heads, head_dim = self._model_layout(config, num_layers)
        self.cache_config = cache_config.for_model(len(layer_types), head_dim)
        # read at every update: the model's attention modules look at this same config object
        self._attention_config = config.get_text_config(decoder=True) if config is not None else None
        layers = [
            self._make_layer(i, layer_type, kwargs, heads, head_dim)
            for i, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs))
        ]
        super().__init__(layers=layers)
        if self.cache_config.attention == "fused":
            _select_fused_attention(config)

    @staticmethod
    def _model_layout(config, num_layers):
        if config is None:
            if num_layers is None or num_layers < 1:
                raise ValueError("`QuantizedKVCache` needs the model `config` or a positive `num_layers`")
            return ["full_attention"] * num_layers, [{}] * num_layers, None, None
        if not isinstance(config, PretrainedConfig):
            raise ValueError(
                f"`config` has to be the model's `PretrainedConfig` (model.config) but got {type(config).__name__}"
            )
        decoder = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(decoder)
        heads = getattr(decoder, "num_key_value_heads", None) or getattr(decoder, "num_attention_heads", None)
        head_dim = getattr(decoder, "head_dim", None)
        if head_dim is None and getattr(decoder, "hidden_size", None) and getattr(decoder, "num_attention_heads", None):
            head_dim = decoder.hidden_size // decoder.num_attention_heads
        return layer_types, layer_kwargs, heads, head_dim

    def _make_layer(self, idx: int, layer_type: str, kwargs: dict, heads: int | None, head_dim: int | None):
        cfg = self.cache_config
        if layer_type == "dummy":
            return DummyLayer()
        if layer_type in _SLIDING_TYPES:
            # A sliding window is bounded already; it stays in full precision.
            return DynamicSlidingWindowLayer(**kwargs)
        if layer_type != "full_attention":
            raise ValueError(
                f"layer {idx} is a `{layer_type}` layer; `QuantizedKVCache` supports `full_attention` layers "
                f"(quantized) and {list(_SLIDING_TYPES)} layers (kept in full precision) only"
            )
        if idx in cfg.skip_layers:
            return DynamicLayer()
        override = cfg.layer_overrides.get(idx)
        key_bits = (override and override.key_bits) or cfg.resolved_key_bits
        value_bits = (override and override.value_bits) or cfg.resolved_value_bits
        mixed = cfg.quant_type == "mixed"
        return QuantizedKVLayer(
            key_bits=key_bits,
            value_bits=value_bits,
            group_size=cfg.group_size,
            residual_length=cfg.residual_length,
            sink_tokens=cfg.sink_tokens,
            key_axis=cfg.key_axis,
            value_axis=cfg.value_axis,
            symmetric=cfg.symmetric,
            scale_dtype=cfg.scale_dtype,
            clip_percentile=cfg.clip_percentile,
            aged_bits=MIXED_AGED_BITS if mixed else None,
            recent_tokens=cfg.mixed_int8_tokens if mixed else 0,
            layer_idx=idx,
            expected_num_heads=heads,
            expected_head_dim=head_dim,
        )

    @classmethod
    def from_config(cls, cfg: CacheConfig | PluginConfig, model_config: PretrainedConfig | None = None, **kwargs):
        """Build from a loaded YAML config (``load_config(path)``) or a ``CacheConfig``."""
        cache_config = cfg.cache if isinstance(cfg, PluginConfig) else cfg
        if not isinstance(cache_config, CacheConfig):
            raise ValueError(f"`cfg` has to be a PluginConfig or CacheConfig but got {type(cfg).__name__}")
        return cls(model_config, cache_config=cache_config, **kwargs)

    # ------------------------------------------------------------------ checks on Cache entry points
    def _check_layer_idx(self, layer_idx: int) -> None:
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"`layer_idx` has to be in [0, {len(self.layers) - 1}] but got {layer_idx!r}")

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        self._check_layer_idx(layer_idx)
        layer = self.layers[layer_idx]
        # Models pass their attention kwargs as `kwargs=`; the same dict reaches the attention function.
        attention_kwargs = kwargs.get("kwargs")
        if isinstance(layer, QuantizedKVLayer) and isinstance(attention_kwargs, dict) and self.uses_fused_attention:
            return layer.update_for_fused_attention(key_states, value_states, attention_kwargs)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def uses_fused_attention(self) -> bool:
        """True when the model runs ``kvquant_sdpa`` and the config asks for the fused path."""
        return (
            self.cache_config.attention == "fused"
            and self._attention_config is not None
            and getattr(self._attention_config, "_attn_implementation", None) == QUANTIZED_ATTENTION
        )

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and -tokens_to_remove > self.get_seq_length():
            raise ValueError(
                f"cannot crop {-tokens_to_remove} tokens, the cache holds only {self.get_seq_length()}"
            )
        super().crop(tokens_to_remove)

    # ------------------------------------------------------------------ prefix reuse: whole-block import
    def load_blocks(
        self,
        keys: Sequence[QuantizedTensor],
        values: Sequence[QuantizedTensor],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        """Prefill an empty cache from quantized blocks, one [B, H, n, G, D] pair per layer."""
        if len(keys) != len(self.layers) or len(values) != len(self.layers):
            raise ValueError(
                f"`load_blocks` needs key and value blocks for each of the {len(self.layers)} layers but got "
                f"{len(keys)} and {len(values)}"
            )
        for idx, layer in enumerate(self.layers):
            if not isinstance(layer, QuantizedKVLayer):
                raise ValueError(
                    f"layer {idx} is a {type(layer).__name__}; quantized blocks load into quantized layers only"
                )
        for layer, k, v in zip(self.layers, keys, values):
            layer.load_blocks(k, v, dtype, device)

    def flush_residual(self) -> None:
        """Quantize the whole blocks of every layer's residual window now (``QuantizedKVLayer.flush_residual``).

        ``model(ids[:, :h], cache=c); c.flush_residual(); model.generate(ids, cache=c)``
        is the no-store computation a prefix hit of h tokens reproduces exactly:
        the suffix attends to the quantized prefix (docs/prefix_reuse.md).
        """
        for layer in self.layers:
            if isinstance(layer, QuantizedKVLayer):
                layer.flush_residual()

    # ------------------------------------------------------------------ seed-compatible helpers
    def store(self, layer_id: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append K/V ``[batch, heads, seq, head_dim]`` to layer ``layer_id``."""
        self.update(key_states, value_states, layer_id)

    def retrieve(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All K/V of layer ``layer_id``, dequantized to the compute dtype."""
        self._check_layer_idx(layer_id)
        layer = self.layers[layer_id]
        if isinstance(layer, QuantizedKVLayer):
            return layer.dequantized()
        if not getattr(layer, "is_initialized", False):
            raise ValueError(f"layer {layer_id} holds no tokens yet")
        return layer.keys, layer.values

    def get_stats(self) -> dict[str, Any]:
        """Exact bytes held (data, scales, zeros, residual, sinks, blocks kept in full precision) against a
        full-precision cache; ``fallback_events`` counts blocks that could not be quantized."""
        per_layer = [_layer_stats(layer) for layer in self.layers]
        quantized = sum(s["quantized_bytes"] for s in per_layer)
        residual = sum(s["residual_bytes"] for s in per_layer)
        sinks = sum(s["sink_bytes"] for s in per_layer)
        fallback = sum(s["fallback_bytes"] for s in per_layer)
        fp = sum(s["fp_bytes"] for s in per_layer)
        total = quantized + residual + sinks + fallback
        return {
            "seq_length": self.get_seq_length(),
            "num_layers": len(self.layers),
            "quant_type": self.cache_config.quant_type,
            "quantized_bytes": quantized,
            "residual_bytes": residual,
            "sink_bytes": sinks,
            "fallback_bytes": fallback,
            "fallback_blocks": sum(s["fallback_blocks"] for s in per_layer),
            "fallback_events": sum(s["fallback_events"] for s in per_layer),
            "total_bytes": total,
            "fp_bytes": fp,
            "compression_ratio": fp / total if total else 1.0,
        }

    # ------------------------------------------------------------------ snapshot files
    def save(self, path: str | Path) -> int:
        """Write this cache to ``path`` as a checksummed snapshot, atomically; returns the file size in bytes."""
        layers = [_layer_snapshot(i, layer) for i, layer in enumerate(self.layers)]
        state = {"cache_config": dataclasses.asdict(self.cache_config), "layers": layers}
        kinds = [layer_state["kind"] for layer_state in layers]
        meta = {"num_layers": len(layers), "seq_length": self.get_seq_length(), "layer_kinds": kinds}
        return write_snapshot(path, _SNAPSHOT_KIND, state, meta)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model_config: PretrainedConfig | None = None,
        *,
        cache_config: CacheConfig | None = None,
        device: torch.device | str = "cpu",
    ) -> "QuantizedKVCache":
        """A new cache from a ``save``d snapshot; the file is verified whole before anything is built.

        With ``model_config`` the snapshot must fit that model (layers, kinds,
        key/value heads, head_dim); with ``cache_config`` it must have been made
        with those settings. A damaged file raises ``SnapshotError``, a
        mismatch ``ValueError``; either way no cache is returned.
        """
        state, _ = read_snapshot(path, _SNAPSHOT_KIND)
        try:
            saved_config = parse_config({"cache": state["cache_config"]}).cache
            layers = [_layer_from_snapshot(layer_state, device) for layer_state in state["layers"]]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SnapshotError(
                f"snapshot {str(path)!r} is refused: its contents are inconsistent ({exc}); nothing was loaded"
            ) from None
        if cache_config is not None:
            differences = _config_differences(saved_config, cache_config)
            if differences:
                raise ValueError(f"snapshot {str(path)!r} was made with other cache settings: {'; '.join(differences)}")
        if model_config is None:
            cache = cls(None, cache_config=saved_config, num_layers=len(layers))
        else:
            cache = cls(model_config, cache_config=saved_config)
            _check_same_layout(str(path), cache.layers, layers)
        cache.layers = layers
        return cache


def _layer_snapshot(idx: int, layer: Any) -> dict[str, Any]:
    if isinstance(layer, QuantizedKVLayer):
        return {"kind": "quantized", **layer.snapshot_state()}
    if isinstance(layer, DummyLayer):
        return {"kind": "dummy"}
    if isinstance(layer, DynamicLayer):  # DynamicSlidingWindowLayer included
        state = {"kind": "dynamic", "initialized": layer.is_initialized, "keys": layer.keys, "values": layer.values}
        if isinstance(layer, DynamicSlidingWindowLayer):
            state.update(kind="sliding", sliding_window=layer.sliding_window, cumulative_length=layer.cumulative_length)
        return state
    raise ValueError(f"layer {idx} is a {type(layer).__name__}, which `save` does not know how to write")


def _layer_from_snapshot(state: dict[str, Any], device: torch.device | str) -> Any:
    kind = state["kind"]
    if kind == "quantized":
        return QuantizedKVLayer.from_snapshot_state(state, device)
    if kind == "dummy":
        return DummyLayer()
    if kind not in ("dynamic", "sliding"):
        raise ValueError(f"unknown layer kind {kind!r}")
    if kind == "sliding":
        layer = DynamicSlidingWindowLayer(sliding_window=int(state["sliding_window"]))
    else:
        layer = DynamicLayer()
    if state["initialized"]:
        keys, values = state["keys"].to(device), state["values"].to(device)
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        if kind == "sliding":
            layer.cumulative_length = int(state["cumulative_length"])
    return layer


def _layout_of(layer: Any) -> tuple:
    """What a layer's kind and shape say about the model it was made for (None: not known)."""
    if isinstance(layer, QuantizedKVLayer):
        heads, head_dim = layer.expected_num_heads, layer.expected_head_dim
        if layer.is_initialized:
            heads, head_dim = layer.num_heads, layer.head_dim
        return ("quantized", heads, head_dim, layer.key_bits, layer.value_bits)
    if isinstance(layer, DynamicSlidingWindowLayer):
        return ("sliding", layer.sliding_window)
    return (type(layer).__name__,)


def _check_same_layout(path: str, expected: list, loaded: list) -> None:
    if len(expected) != len(loaded):
        raise ValueError(f"snapshot {path!r} holds {len(loaded)} layers but this model has {len(expected)}")
    for idx, (want, got) in enumerate(zip(expected, loaded)):
        a, b = _layout_of(want), _layout_of(got)
        if len(a) != len(b) or any(x is not None and y is not None and x != y for x, y in zip(a, b)):
            raise ValueError(
                f"snapshot {path!r} is from another model or setting: layer {idx} was saved as {b} "
                "(kind, kv heads, head_dim, key bits, value bits) but this model and config give " + str(a)
            )


def _config_differences(saved: CacheConfig, expected: CacheConfig) -> list[str]:
    differences = []
    for f in dataclasses.fields(CacheConfig):
        want, got = getattr(expected, f.name), getattr(saved, f.name)
        if f.name == "group_size" and want is None:
            continue  # unresolved: any resolution is acceptable
        if want != got:
            differences.append(f"`{f.name}` is {got!r} in the file, {want!r} expected")
    return differences


def create_quantized_kv_cache(
    quant_type: str = "int4",
    num_layers: int = 1,
    num_heads: int | None = None,
    head_dim: int | None = None,
    **options: Any,
) -> QuantizedKVCache:
    """Model-free cache: ``num_layers`` quantized layers checked against ``num_heads``/``head_dim``."""
    cache_config = CacheConfig(quant_type=quant_type, **options).for_model(num_layers, head_dim)
    cache = QuantizedKVCache(None, cache_config=cache_config, num_layers=num_layers)
    for layer in cache.layers:
        if isinstance(layer, QuantizedKVLayer):
            layer.expected_num_heads, layer.expected_head_dim = num_heads, head_dim
    return cache
