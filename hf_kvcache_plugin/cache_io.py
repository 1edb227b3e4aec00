"""Snapshots: a cache's layers to plain tensors and numbers and back, every part checked on the way in.

``cache_state`` / ``layers_from_state`` turn the layers (ours, full-attention
and sliding-window, transformers' dynamic, sliding and dummy ones) into plain
tensors and numbers and back;
``QuantizedKVCache.save`` / ``load`` write and read them with
``snapshot_file`` (safetensors, checksummed). A file that passed the
checksum may still be crafted or written by a buggy build, so
``layers_from_state`` checks what it builds from: each quantized layer's
settings against the file's ``cache_config``, dtypes, shapes against the
recorded ``[batch, heads, head_dim, value_head_dim]``, a sliding layer's
window and the tokens that left it, every block tier's
codes, scales and zeros (finite), token counts against the recorded length,
and one length for every full-attention layer. Any fault is a
``SnapshotError`` naming the layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ._compat import DummyLayer
from .config import CacheConfig
from .layer import LayerSettings, QuantizedKVLayer
from .quantization import dtype_from_name, dtype_name, quantized_tensor_problem
from .sliding_layer import QuantizedSlidingWindowLayer
from .snapshot_file import SNAPSHOT_FORMAT_VERSION, SnapshotError, read_snapshot, write_snapshot

__all__ = [
    "SNAPSHOT_FORMAT_VERSION",
    "SnapshotError",
    "cache_state",
    "check_same_layout",
    "config_differences",
    "layers_from_state",
    "read_snapshot",
    "write_snapshot",
]

# settings that depend on how the cache was built (with a model or without), not on how its bytes were made
_BUILD_SETTINGS = ("expected_num_heads", "expected_head_dim")


def cache_state(layers: list, cache_config: CacheConfig, seq_length: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a cache's layers: what ``write_snapshot`` takes."""
    states = [_layer_state(i, layer) for i, layer in enumerate(layers)]
    state = {"cache_config": dataclasses.asdict(cache_config), "layers": states}
    meta = {
        "num_layers": len(states),
        "seq_length": seq_length,
        "layer_kinds": [s["kind"] for s in states],
    }
    return state, meta


def layers_from_state(state: dict[str, Any], device: torch.device | str, cache_config: CacheConfig) -> list:
    """The layers a ``cache_state`` describes, each checked (see the module docstring); ``SnapshotError`` if not."""
    layer_states = state["layers"]
    if not isinstance(layer_states, list) or not layer_states:
        raise SnapshotError(f"`layers` has to be a non-empty list but got {type(layer_states).__name__}")
    layers = [_layer_from_state(idx, s, device, cache_config) for idx, s in enumerate(layer_states)]
    # an empty layer counts 0 tokens: a forward step fills every layer, so one empty beside full ones is a fault
    full = {
        idx: layer.get_seq_length() for idx, layer in enumerate(layers)
        if isinstance(layer, (QuantizedKVLayer, DynamicLayer)) and not isinstance(layer, DynamicSlidingWindowLayer)
    }  # fmt: skip
    if len(set(full.values())) > 1:
        raise SnapshotError(f"the full-attention layers hold different numbers of tokens: {full}")
    return layers


def _quantized_layer_state(layer: QuantizedKVLayer) -> dict[str, Any]:
    """Settings and every held tensor, as plain tensors and numbers."""
    state: dict[str, Any] = {"settings": dataclasses.asdict(layer.settings), "initialized": layer.is_initialized}
    if isinstance(layer, QuantizedSlidingWindowLayer):
        state["sliding_window"] = layer.sliding_window
        if layer.is_initialized:
            state["window_dropped_tokens"] = layer.window_dropped_tokens
    if layer.is_initialized:
        state.update(
            dtype=dtype_name(layer.dtype),
            length=layer.get_seq_length() - state.get("window_dropped_tokens", 0),  # seen, less those that left a window
            dropped_tokens=layer.dropped_tokens,
            shape=[layer.batch_size, layer.num_heads, layer.head_dim, layer.value_head_dim],
            sink_keys=layer.sink_keys, sink_values=layer.sink_values,
            residual_keys=layer.residual_keys, residual_values=layer.residual_values,
            keys=layer.quantized_keys.snapshot_state(), values=layer.quantized_values.snapshot_state(),
        )  # fmt: skip
    return state


def _quantized_layer_from_state(
    idx: int, state: dict[str, Any], device: torch.device | str, cache_config: CacheConfig, sliding: bool = False
) -> QuantizedKVLayer:
    settings = LayerSettings(**state["settings"])
    expected = LayerSettings.for_layer(cache_config, idx)
    if sliding:
        window = state["sliding_window"]
        if type(window) is not int or window < 1:
            raise SnapshotError(f"layer {idx}: `sliding_window` has to be a positive integer but got {window!r}")
        expected = dataclasses.replace(expected, sink_tokens=0)  # a window keeps no sinks (sliding_layer)
    differences = [
        f"{f.name} {getattr(settings, f.name)!r} (the cache_config gives {getattr(expected, f.name)!r})"
        for f in dataclasses.fields(LayerSettings)
        if f.name not in _BUILD_SETTINGS and getattr(settings, f.name) != getattr(expected, f.name)
    ]
    if differences:
        raise SnapshotError(f"layer {idx} was saved with other settings than the file's cache_config: {differences}")
    layer = QuantizedSlidingWindowLayer(settings, sliding_window=window) if sliding else QuantizedKVLayer(settings)
    if state["initialized"] is False:
        return layer
    if state["initialized"] is not True:
        raise SnapshotError(f"layer {idx}: `initialized` has to be true or false but got {state['initialized']!r}")
    device = torch.device(device)
    dtype = dtype_from_name(state["dtype"])
    if not dtype.is_floating_point:
        raise SnapshotError(f"layer {idx}: dtype {dtype} is not a floating point dtype")
    shape = state["shape"]
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(n) is int and n >= 1 for n in shape)):
        raise SnapshotError(f"layer {idx}: `shape` has to be 4 positive integers [batch, heads, d, dv] but got {shape!r}")
    b, h, d, dv = shape
    for name, width in (("sink_keys", d), ("sink_values", dv), ("residual_keys", d), ("residual_values", dv)):
        _check_tokens(f"layer {idx} {name}", state[name], dtype, b, h, width)
    layer.lazy_initialization(
        torch.empty(b, h, 0, d, dtype=dtype, device=device), torch.empty(b, h, 0, dv, dtype=dtype, device=device)
    )
    for name in ("sink_keys", "sink_values", "residual_keys", "residual_values"):
        setattr(layer, name, state[name].to(device))
    layer.quantized_keys.restore_snapshot_state(state["keys"], device)
    layer.quantized_values.restore_snapshot_state(state["values"], device)
    length = state["length"]
    if type(length) is not int or length < 0:
        raise SnapshotError(f"layer {idx}: `length` has to be an integer >= 0 but got {length!r}")
    layer._length = length
    dropped = state.get("dropped_tokens", 0)
    if type(dropped) is not int or not 0 <= dropped <= length:
        raise SnapshotError(f"layer {idx}: `dropped_tokens` has to be an integer in [0, {length}] but got {dropped!r}")
    layer.dropped_tokens = dropped
    if sliding:
        window_dropped = state["window_dropped_tokens"]
        if type(window_dropped) is not int or window_dropped < 0:
            raise SnapshotError(
                f"layer {idx}: `window_dropped_tokens` has to be an integer >= 0 but got {window_dropped!r}"
            )
        layer.window_dropped_tokens = window_dropped
    for name, (sink, blocks, residual, width) in {
        "keys": (layer.sink_keys, layer.quantized_keys, layer.residual_keys, d),
        "values": (layer.sink_values, layer.quantized_values, layer.residual_values, dv),
    }.items():
        g = blocks.codec.group_size
        for tier in blocks.tiers:
            problem = quantized_tensor_problem(tier)
            if problem is None and (tier.shape[:2], tier.shape[3:], tier.dtype) != ((b, h), (g, width), dtype):
                problem = f"logical shape {list(tier.shape)} / {tier.dtype} is not [{b}, {h}, n, {g}, {width}] / {dtype}"
            if problem:
                raise SnapshotError(f"layer {idx} {name} blocks: {problem}")
        for block, exact in blocks.full_precision_blocks.items():
            _check_tokens(f"layer {idx} {name} exact block {block}", exact, dtype, b, h, width, tokens=g)
        held = sink.shape[-2] + blocks.num_tokens + residual.shape[-2] + dropped
        if held != length:
            raise SnapshotError(f"layer {idx}: the saved {name} hold {held} tokens but the layer records {length}")
    if layer.sink_keys.shape[-2] != layer.sink_values.shape[-2] or (
        layer.residual_keys.shape[-2] != layer.residual_values.shape[-2]
    ):
        raise SnapshotError(f"layer {idx}: keys and values hold different numbers of sink or residual tokens")
    if layer.sink_keys.shape[-2] > settings.sink_tokens:
        raise SnapshotError(f"layer {idx}: {layer.sink_keys.shape[-2]} sink tokens, the settings keep {settings.sink_tokens}")
    return layer


def _check_tokens(
    what: str, t: Any, dtype: torch.dtype, b: int, h: int, width: int, tokens: int | None = None
) -> None:
    """``t`` is [b, h, tokens (any when None), width] of ``dtype``."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise SnapshotError(f"{what} has to be a 4-d tensor but got {getattr(t, 'shape', type(t).__name__)}")
    n = t.shape[2] if tokens is None else tokens
    if tuple(t.shape) != (b, h, n, width) or t.dtype != dtype:
        raise SnapshotError(f"{what} is {list(t.shape)} of {t.dtype}, not [{b}, {h}, {n}, {width}] of {dtype}")


def _layer_state(idx: int, layer: Any) -> dict[str, Any]:
    if isinstance(layer, QuantizedKVLayer):
        kind = "quantized_sliding" if isinstance(layer, QuantizedSlidingWindowLayer) else "quantized"
        return {"kind": kind, **_quantized_layer_state(layer)}
    if isinstance(layer, DummyLayer):
        return {"kind": "dummy"}
    if isinstance(layer, DynamicLayer):  # DynamicSlidingWindowLayer included
        state = {"kind": "dynamic", "initialized": layer.is_initialized, "keys": layer.keys, "values": layer.values}
        if isinstance(layer, DynamicSlidingWindowLayer):
            state.update(kind="sliding", sliding_window=layer.sliding_window, cumulative_length=layer.cumulative_length)
        return state
    raise ValueError(f"layer {idx} is a {type(layer).__name__}, which `save` does not know how to write")


def _layer_from_state(idx: int, state: dict[str, Any], device: torch.device | str, cache_config: CacheConfig) -> Any:
    kind = state["kind"]
    if kind in ("quantized", "quantized_sliding"):
        return _quantized_layer_from_state(idx, state, device, cache_config, sliding=kind == "quantized_sliding")
    if kind == "dummy":
        return DummyLayer()
    if kind not in ("dynamic", "sliding"):
        raise SnapshotError(f"layer {idx} is of unknown kind {kind!r}")
    if kind == "sliding":
        window = state["sliding_window"]
        if type(window) is not int or window < 1:
            raise SnapshotError(f"layer {idx}: `sliding_window` has to be a positive integer but got {window!r}")
        layer = DynamicSlidingWindowLayer(sliding_window=window)
    else:
        layer = DynamicLayer()
    if state["initialized"] is True:
        keys, values = state["keys"], state["values"]
        if not (
            isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.dim() == values.dim() == 4
            and keys.dtype.is_floating_point and values.dtype == keys.dtype and values.shape[:3] == keys.shape[:3]
        ):  # fmt: skip
            raise SnapshotError(
                f"layer {idx}: keys and values have to be 4-d tensors holding the same tokens in one floating point "
                f"dtype but got {getattr(keys, 'shape', keys)!r} and {getattr(values, 'shape', values)!r}"
            )
        keys, values = keys.to(device), values.to(device)
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        if kind == "sliding":
            cumulative = state["cumulative_length"]
            if type(cumulative) is not int or cumulative < keys.shape[-2]:
                raise SnapshotError(f"layer {idx}: `cumulative_length` {cumulative!r} is below the {keys.shape[-2]} held")
            layer.cumulative_length = cumulative
    elif state["initialized"] is not False:
        raise SnapshotError(f"layer {idx}: `initialized` has to be true or false but got {state['initialized']!r}")
    return layer


def _layout_of(layer: Any) -> tuple:
    """What a layer's kind and shape say about the model it was made for (None: not known)."""
    if isinstance(layer, QuantizedKVLayer):
        heads, head_dim = layer.settings.expected_num_heads, layer.settings.expected_head_dim
        if layer.is_initialized:
            heads, head_dim = layer.num_heads, layer.head_dim
        layout = ("quantized", heads, head_dim, layer.key_bits, layer.value_bits)
        if isinstance(layer, QuantizedSlidingWindowLayer):
            layout = ("quantized_sliding", *layout[1:], layer.sliding_window)
        return layout
    if isinstance(layer, DynamicSlidingWindowLayer):
        return ("sliding", layer.sliding_window)
    return (type(layer).__name__,)


def check_same_layout(expected: list, loaded: list) -> None:
    """The loaded layers have the kinds and shapes of the layers this model and config make."""
    if len(expected) != len(loaded):
        raise SnapshotError(f"it holds {len(loaded)} layers but this model has {len(expected)}")
    for idx, (want, got) in enumerate(zip(expected, loaded)):
        a, b = _layout_of(want), _layout_of(got)
        if len(a) != len(b) or any(x is not None and y is not None and x != y for x, y in zip(a, b)):
            raise SnapshotError(
                f"it is from another model or setting: layer {idx} was saved as {b} "
                "(kind, kv heads, head_dim, key bits, value bits[, sliding window]) but this model and config give " + str(a)
            )


def config_differences(saved: CacheConfig, expected: CacheConfig) -> list[str]:
    differences = []
    for f in dataclasses.fields(CacheConfig):
        want, got = getattr(expected, f.name), getattr(saved, f.name)
        if f.name == "group_size" and want is None:
            continue  # unresolved: any resolution is acceptable
        if f.name == "max_size_mb":
            continue  # the live cache's budget, not how the file's bytes were made
        if want != got:
            differences.append(f"`{f.name}` is {got!r} in the file, {want!r} expected")
    return differences
