"""``QuantizedKVLayer``: one attention layer's keys and values, mostly quantized.

Per layer, tokens live in three places, in order:

    [ sinks (full precision) | quantized blocks (append-only) | residual window (full precision) ]

``update`` appends new tokens to the sinks until ``sink_tokens`` are held, then
to the residual window. Once the window holds at least ``residual_length + G``
tokens, its oldest whole blocks of G tokens are quantized and appended; the
newest ``residual_length`` tokens always stay exact. The first ``update``
(prefill) returns its inputs unchanged; later ones return sinks + dequantized
blocks + residual, in the compute dtype, on the inputs' device.

Fused attention reads the layer instead (``attention_segments``): the cache
appends with ``append(..., defer_flush=True)`` and the attention function
calls ``flush_deferred`` once it has read this step's exact window.

A block that cannot be quantized (NaN/Inf, or a range that overflows the
scale dtype) stays in full precision at its place in the history and is
counted (``fallback_blocks`` / ``fallback_events`` in ``stats``).

A cache over its byte budget may drop the oldest blocks (``shrink``): the
layer then holds ``dropped_tokens`` fewer tokens than it has seen.
``get_seq_length`` still counts every token seen, so the model's positions
(``cache_position``) go on from there and the held keys keep the rotation of
their true positions (StreamingLLM without re-rotation); ``get_mask_sizes``
gives the held length with the dropped tokens as its offset.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .blocks import QuantizedBlocks
from .layer_inputs import batch_indices, check_key_value_states, tracks_grad
from .layer_settings import LayerSettings
from .quantization import QuantizedTensor
from .residual_window import ResidualWindow, tensor_nbytes

__all__ = ["LayerSettings", "QuantizedKVLayer", "EMPTY_LAYER_STATS", "tensor_nbytes"]

# the keys of QuantizedKVLayer.stats(), all 0 for a layer that holds nothing
EMPTY_LAYER_STATS = (
    "seq_length", "quantized_bytes", "residual_bytes", "sink_bytes", "fallback_bytes", "fallback_blocks",
    "fallback_events", "fp_bytes",
)  # fmt: skip

logger = logging.getLogger(__name__)


class QuantizedKVLayer(ResidualWindow, CacheLayerMixin):
    """One attention layer's quantized cache (see the module docstring for the layout).

    Built from ``LayerSettings`` or from their fields as keywords:
    ``QuantizedKVLayer(key_bits=4, value_bits=4, group_size=32, residual_length=128)``.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, settings: LayerSettings | None = None, **options: Any):
        super().__init__()
        if settings is not None and options:
            raise ValueError("pass either `settings` or the settings as keywords, not both")
        self.settings = settings if settings is not None else LayerSettings(**options)
        self._clear()

    # the settings other modules read by name
    key_bits = property(lambda self: self.settings.key_bits)
    value_bits = property(lambda self: self.settings.value_bits)
    group_size = property(lambda self: self.settings.group_size)
    residual_length = property(lambda self: self.settings.residual_length)
    layer_idx = property(lambda self: self.settings.layer_idx)

    # ------------------------------------------------------------------ state
    def _clear(self) -> None:
        self.is_initialized = False
        self.sink_keys = self.sink_values = None
        self._clear_window()
        self.quantized_keys: QuantizedBlocks | None = None
        self.quantized_values: QuantizedBlocks | None = None
        self._length = 0  # tokens seen, dropped ones included
        self.dropped_tokens = 0  # oldest blocks' tokens dropped by a budget shrink
        self._flush_deferred = False

    def _name(self) -> str:
        return f"layer {self.layer_idx}" if self.layer_idx is not None else "this layer"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        check_key_value_states(self._name(), key_states, value_states)
        b, h, _, d = key_states.shape
        dv = value_states.shape[-1]
        s = self.settings
        s.check_shape(self._name(), h, d, dv)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, self.head_dim, self.value_head_dim = b, h, d, dv
        self.quantized_keys = s.blocks("keys")
        self.quantized_values = s.blocks("values")
        self.sink_keys = key_states.new_empty(b, h, 0, d)
        self.sink_values = value_states.new_empty(b, h, 0, dv)
        self.residual_keys = key_states.new_empty(b, h, 0, d)
        self.residual_values = value_states.new_empty(b, h, 0, dv)
        self.is_initialized = True

    def check_matches(self, key_states: torch.Tensor, value_states: torch.Tensor, batch: bool = True) -> None:
        """States this layer can take: its batch size (unless ``batch=False``), heads, head dims and dtype."""
        check_key_value_states(self._name(), key_states, value_states)
        b, h, _, d = key_states.shape
        dv = value_states.shape[-1]
        if not batch:
            got = (h, d, dv, key_states.dtype, value_states.dtype)
            held = (self.num_heads, self.head_dim, self.value_head_dim, self.dtype, self.dtype)
            if got != held:
                raise ValueError(
                    f"{self._name()}: got key/value states with (heads, head_dim, value head_dim, dtypes) = {got} "
                    f"but this layer holds {held}"
                )
            return
        if key_states.device != self.device or value_states.device != self.device:
            raise ValueError(
                f"{self._name()}: got key/value states on {key_states.device}/{value_states.device} but this layer "
                f"holds its tokens on {self.device}; a cache stays on the device of its first step (start a new "
                "cache after moving the model)"
            )
        expected = (self.batch_size, self.num_heads, self.head_dim, self.value_head_dim)
        if (b, h, d, dv) != expected:
            raise ValueError(
                f"{self._name()}: got key/value states with (batch, heads, head_dim, value head_dim) = "
                f"{(b, h, d, dv)} but this cache holds {expected}"
            )
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise ValueError(
                f"{self._name()}: got key/value states of dtype {key_states.dtype}/{value_states.dtype} but this "
                f"cache holds {self.dtype}"
            )

    # ------------------------------------------------------------------ append and flush
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        had_history = self._length > 0
        self.append(key_states, value_states, defer_flush=True)
        if tracks_grad(key_states, value_states):
            # the stored history is detached (codes carry no gradient, and a cache must not keep every step's
            # graph alive); this step's own tokens keep theirs, and the values are the no-grad path's
            n = key_states.shape[-2]
            if not had_history:
                keys_out, values_out = key_states, value_states
            else:
                keys_out, values_out = self._materialize()
                keys_out = torch.cat([keys_out[:, :, :-n], key_states], dim=-2)
                values_out = torch.cat([values_out[:, :, :-n], value_states], dim=-2)
        elif had_history:
            keys_out, values_out = self._materialize()
        else:
            # Prefill: everything is in the inputs, returned exact.
            keys_out = torch.cat([self.sink_keys, self.residual_keys], dim=-2)
            values_out = torch.cat([self.sink_values, self.residual_values], dim=-2)
        self.flush_deferred()
        return keys_out, values_out

    @property
    def holds_tokens(self) -> bool:
        return self._length > 0

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, defer_flush: bool = False) -> None:
        """New tokens fill the sinks first, then the residual window; full blocks are then quantized.

        ``defer_flush``: the blocks are quantized at ``flush_deferred()`` (or the
        next append) instead, so that a reader of this step sees the exact window.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            self.check_matches(key_states, value_states)
        key_states, value_states = key_states.detach(), value_states.detach()  # see `update`
        self.flush_deferred()
        had_history = self._length > 0
        self._length += key_states.shape[-2]
        n_sink = min(key_states.shape[-2], self.settings.sink_tokens - self.sink_keys.shape[-2])
        if n_sink > 0:
            self.sink_keys = torch.cat([self.sink_keys, key_states[:, :, :n_sink]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[:, :, :n_sink]], dim=-2)
            key_states, value_states = key_states[:, :, n_sink:], value_states[:, :, n_sink:]
        self._append_to_window(key_states, value_states, had_history)
        self._flush_deferred = True
        if not defer_flush:
            self.flush_deferred()

    @property
    def flush_pending(self) -> bool:
        """True between ``append(defer_flush=True)`` and ``flush_deferred()``: a reader has not finished."""
        return self._flush_deferred

    def flush_deferred(self) -> None:
        """Quantize the full blocks an ``append(defer_flush=True)`` left in the window."""
        if self._flush_deferred:
            self._flush_deferred = False
            self._flush_full_blocks(self.residual_length)

    def _flush_full_blocks(self, keep: int) -> None:
        """Quantize the oldest whole blocks of the window, keeping at least ``keep`` tokens exact."""
        excess = self.residual_keys.shape[-2] - keep
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
        self._drop_window_head(n_tokens)

    def flush_residual(self) -> None:
        """Quantize every whole block of G tokens in the residual window now, leaving fewer than G exact.

        After a prefill of h tokens (h a multiple of G) this gives the layout a
        prefix-store hit of those h tokens loads: all h as blocks, the same
        bytes (the same codec on the same exact K/V, block-aligned). Used to
        build the reference that reuse is compared with bit for bit.
        """
        if not self.is_initialized:
            return
        self.flush_deferred()
        self._flush_full_blocks(0)

    def load_blocks(
        self, keys: QuantizedTensor, values: QuantizedTensor, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        """Fill an empty layer with already-quantized blocks [B, H, n, G, D]: they become its history.

        With ``QuantizedBlocks.append_encoded`` the only way blocks enter a
        layer, so a reused prefix is never re-quantized.
        """
        if self.is_initialized:
            raise ValueError(f"{self._name()} already holds tokens; blocks can only be loaded into an empty layer")
        if self.settings.sink_tokens:
            raise ValueError(
                f"{self._name()}: loading blocks needs `sink_tokens == 0` (sinks precede the blocks in full "
                f"precision) but got {self.settings.sink_tokens}"
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

    # ------------------------------------------------------------------ read
    def attention_segments(self) -> list[tuple[Any, Any, int]]:
        """(keys, values, n_tokens) oldest first: dense tensors or aligned QuantizedTensor tiers."""
        segments = []
        if self.sink_keys.shape[-2]:
            segments.append((self.sink_keys, self.sink_values, self.sink_keys.shape[-2]))
        k_tiers, v_tiers = self.quantized_keys.tiers, self.quantized_values.tiers
        aligned = [t.shape[2] for t in k_tiers] == [t.shape[2] for t in v_tiers]
        if self.quantized_keys.full_precision_blocks or self.quantized_values.full_precision_blocks or not aligned:
            # A block kept exact after NaN/Inf leaves placeholder codes in its tier; such histories are
            # rare, so they are read dequantized (exact blocks in place) rather than block by block. So are keys
            # and values whose tiers a budget shrink cut at different blocks (their bits differ).
            if self.quantized_keys.num_blocks:
                dtype = self.residual_keys.dtype
                segments.append((
                    self.quantized_keys.dequantize(dtype),
                    self.quantized_values.dequantize(dtype),
                    self.quantized_keys.num_tokens,
                ))
        else:
            for k_tier, v_tier in zip(k_tiers, v_tiers):
                # the data tensor's size, not the recorded shape: under torch.compile a Python int would become a
                # symbol no graph input defines (Inductor then fails on it)
                segments.append((k_tier, v_tier, k_tier.data.shape[2] * self.group_size))
        if self.residual_keys.shape[-2]:
            segments.append((self.residual_keys, self.residual_values, self.residual_keys.shape[-2]))
        return segments

    def _materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[sinks | dequantized blocks | residual] for keys and values, one allocation each."""
        return self._dense("keys"), self._dense("values")

    def _dense(self, stream: str) -> torch.Tensor:
        """[sinks | dequantized blocks | residual] of ``stream`` (``"keys"`` or ``"values"``), one allocation."""
        if stream == "keys":
            sink, blocks, residual = self.sink_keys, self.quantized_keys, self.residual_keys
        else:
            sink, blocks, residual = self.sink_values, self.quantized_values, self.residual_values
        s, q, r = sink.shape[-2], blocks.num_tokens, residual.shape[-2]
        out = residual.new_empty(residual.shape[0], residual.shape[1], s + q + r, residual.shape[-1])
        out[:, :, :s] = sink
        if q:
            blocks.dequantize_into(out[:, :, s : s + q])
        out[:, :, s + q :] = residual
        return out

    def history(self, stream: str) -> torch.Tensor:
        """The tokens the next step attends to, of ``stream`` (``"keys"`` / ``"values"``), dense."""
        return self._dense(stream)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached keys and values as dense tensors in the compute dtype."""
        if not self.is_initialized:
            raise ValueError(f"{self._name()} holds no tokens yet")
        return self.history("keys"), self.history("values")

    # `DynamicLayer` keeps its history in `keys` / `values`; code that reads them (cross-attention reusing its
    # states, cache tests, user code) gets this layer's history the same way, dequantized on each access.
    @property
    def keys(self) -> torch.Tensor | None:
        """The cached keys ``[batch, kv_heads, tokens, head_dim]`` in the compute dtype, as ``DynamicLayer.keys``;
        None before the first update. Each access dequantizes the history anew (``tokens x head_dim`` values per
        head, a fresh tensor): read ``dequantized()`` once for keys and values together."""
        return self.history("keys") if self.is_initialized else None

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        _refuse_history_write(self, "keys", value)

    @property
    def values(self) -> torch.Tensor | None:
        """The cached values, as ``keys`` (dequantized on each access)."""
        return self.history("values") if self.is_initialized else None

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        _refuse_history_write(self, "values", value)

    def get_seq_length(self) -> int:
        return self._length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # dropped tokens precede every held one but the sinks: the offset maps the held window's end onto its
        # true positions, so the causal mask between new tokens stays right (as for a sliding window)
        return self._length - self.dropped_tokens + query_length, self.dropped_tokens

    @property
    def fallback_events(self) -> int:
        """Blocks of keys or values that could not be quantized so far (kept in full precision)."""
        if not self.is_initialized:
            return 0
        return self.quantized_keys.fallback_events + self.quantized_values.fallback_events

    @property
    def nbytes(self) -> int:
        """Every byte this layer holds: blocks (codes, scales, zeros, blocks kept exact), sinks and residual."""
        if not self.is_initialized:
            return 0
        dense = tensor_nbytes(self.sink_keys) + tensor_nbytes(self.sink_values) + self._window_nbytes
        return self.quantized_keys.nbytes + self.quantized_values.nbytes + dense

    def nbytes_after_append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> int:
        """``nbytes`` once ``append(key_states, value_states)`` and its flush are done, predicted without touching
        the layer: the same path through sinks, residual window, blocks and mixed-precision aging (blocks that
        cannot be quantized, kept exact, excepted)."""
        dense, blocks, _ = self.append_footprint(key_states, value_states)
        return dense + blocks

    def append_footprint(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[int, int, int]:
        """``nbytes_after_append`` in parts: (bytes of sinks and window, bytes of blocks, blocks per stream)."""
        check_key_value_states(self._name(), key_states, value_states)
        b, h, n, d = key_states.shape
        dv = value_states.shape[-1]
        s = self.settings
        held_sinks = self.sink_keys.shape[-2] if self.is_initialized else 0
        held = self.residual_keys.shape[-2] if self.is_initialized else 0
        to_sinks = max(0, min(n, s.sink_tokens - held_sinks))
        residual = held + n - to_sinks
        new_blocks = max(0, residual - s.residual_length) // s.group_size
        residual -= new_blocks * s.group_size
        if n == to_sinks:  # the window is not touched
            in_buffers = self.is_initialized and self._window_buffers is not None
        else:
            in_buffers = self._writes_window_in_place(held, n - to_sinks, had_history=self._length > 0)
        window_tokens = self.window_capacity if in_buffers else residual
        dense = b * h * (held_sinks + to_sinks + window_tokens) * (d + dv) * key_states.element_size()
        keys = self.quantized_keys if self.is_initialized else s.blocks("keys")
        values = self.quantized_values if self.is_initialized else s.blocks("values")
        # a caller that expands the batch for num_return_sequences repeats the history's rows first
        repeat = b // self.batch_size if self.is_initialized and b % self.batch_size == 0 else 1
        dtype = key_states.dtype
        blocks = keys.nbytes_after(new_blocks, b, h, d, dtype, repeat)
        blocks += values.nbytes_after(new_blocks, b, h, dv, dtype, repeat)
        return dense, blocks, keys.num_blocks + new_blocks

    def nbytes_after_load(self, keys: QuantizedTensor, values: QuantizedTensor, dtype: torch.dtype) -> int:
        """``nbytes`` once ``load_blocks(keys, values, dtype, ...)`` is done (blocks ``[B, H, n, G, D]``), predicted."""
        b, h, n, _, d = keys.shape
        streams = (("keys", d), ("values", values.shape[-1]))
        return sum(self.settings.blocks(name).nbytes_after(n, b, h, dim, dtype) for name, dim in streams)

    def stats(self) -> dict[str, int]:
        if not self.is_initialized:
            return dict.fromkeys(EMPTY_LAYER_STATS, 0)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        streams = (self.quantized_keys, self.quantized_values)
        fallback_bytes = sum(s.full_precision_nbytes for s in streams)
        return {
            "seq_length": self._length,
            "quantized_bytes": sum(s.nbytes for s in streams) - fallback_bytes,
            "residual_bytes": self._window_nbytes,
            "sink_bytes": tensor_nbytes(self.sink_keys) + tensor_nbytes(self.sink_values),
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
        croppable = self.residual_keys.shape[-2] + self.quantized_keys.num_tokens
        if self.dropped_tokens and count > croppable:
            raise ValueError(
                f"{self._name()}: cannot crop {count} tokens: {self.dropped_tokens} tokens before the last "
                f"{croppable} were dropped to fit the byte budget, so a crop may remove at most {croppable}"
            )
        self._length -= count
        self._release_window_buffers()
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
        self._release_window_buffers()
        for name in ("sink_keys", "sink_values", "residual_keys", "residual_values"):
            setattr(self, name, fn(getattr(self, name)))
        self.quantized_keys.map_tensors(fn)
        self.quantized_values.map_tensors(fn)
        self.batch_size = self.residual_keys.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            idx = beam_idx.to(self.device)
            self._map_all(lambda t: t.index_select(0, idx))

    def batch_select_indices(self, indices: torch.Tensor | Sequence[int]) -> None:
        """Keep the batch rows ``indices`` (a 1-d tensor or sequence of ints, or a bool mask), in that order."""
        if self.is_initialized:
            idx = batch_indices(indices, self.batch_size, self.device)
            self._map_all(lambda t: t.index_select(0, idx.to(t.device)))

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


def _refuse_history_write(layer: QuantizedKVLayer, name: str, value: Any) -> None:
    # the mixin's constructor sets `keys = values = None`; anything else would bypass the quantized storage
    if value is not None:
        raise AttributeError(
            f"{layer._name()}: `{name}` is read-only (the history is held quantized); add tokens with `update`"
        )
