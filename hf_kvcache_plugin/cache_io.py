"""Snapshots: a cache's layers to a file and back, refused whole when anything is off.

``cache_state`` / ``layers_from_state`` turn the layers (ours, transformers'
dynamic, sliding and dummy ones) into plain tensors and numbers and back;
``QuantizedKVCache.save`` / ``load`` use them. The file is a checked envelope
around a ``torch.save`` payload::

    b"HFKVSNAP" | u32 format version | u32 header length | header (JSON) | payload

The header names the snapshot ``kind``, the payload's exact length and its
SHA-256, plus free-form ``meta``. ``read_snapshot`` verifies all of that
before it unpickles anything, and unpickles with ``weights_only=True``
(tensors and plain containers only, no code), so a truncated, padded,
corrupted or foreign file is refused as a whole with a ``SnapshotError``
instead of being half-loaded. ``write_snapshot`` writes to a temporary file
in the same directory and renames it over the target, so a crash while saving
leaves the old file or none, never a torn one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ._compat import DummyLayer
from .config import CacheConfig
from .layer import LayerSettings, QuantizedKVLayer
from .quantization import dtype_from_name, dtype_name

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

SNAPSHOT_FORMAT_VERSION = 1
_MAGIC = b"HFKVSNAP"
_PREAMBLE = struct.Struct("<8sII")  # magic, format version, header length
_MAX_HEADER_BYTES = 1 << 20


class SnapshotError(ValueError):
    """A snapshot file that cannot be trusted: truncated, corrupted, of another kind or version."""


def write_snapshot(path: str | Path, kind: str, state: Any, meta: dict[str, Any] | None = None) -> int:
    """Write ``state`` (tensors, numbers, strings, lists, tuples, dicts) atomically; returns the file size."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = json.dumps(
        {
            "kind": kind,
            "payload_bytes": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "meta": meta or {},
        },
        sort_keys=True,
    ).encode()
    blob = _PREAMBLE.pack(_MAGIC, SNAPSHOT_FORMAT_VERSION, len(header)) + header + payload
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(blob)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # leave no temporary behind, whatever interrupted the write; the error itself propagates
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return len(blob)


def read_snapshot(path: str | Path, kind: str) -> tuple[Any, dict[str, Any]]:
    """Verified ``(state, meta)`` of a snapshot of ``kind``; raises ``SnapshotError`` naming the file and the fault."""
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"snapshot {str(path)!r} does not exist")
    blob = path.read_bytes()

    def refuse(why: str) -> SnapshotError:
        return SnapshotError(f"snapshot {str(path)!r} is refused: {why}; nothing was loaded")

    if len(blob) < _PREAMBLE.size:
        raise refuse(f"it is truncated ({len(blob)} bytes, shorter than the {_PREAMBLE.size}-byte preamble)")
    magic, version, header_len = _PREAMBLE.unpack_from(blob)
    if magic != _MAGIC:
        raise refuse(f"it does not start with {_MAGIC!r} (not a hf_kvcache_plugin snapshot)")
    if version != SNAPSHOT_FORMAT_VERSION:
        raise refuse(f"format version {version} is not supported (this version reads {SNAPSHOT_FORMAT_VERSION})")
    header_end = _PREAMBLE.size + header_len
    if header_len > _MAX_HEADER_BYTES or header_end > len(blob):
        raise refuse(f"it is truncated or corrupted (header of {header_len} bytes, file of {len(blob)})")
    try:
        header = json.loads(blob[_PREAMBLE.size : header_end])
        payload_bytes, digest = int(header["payload_bytes"]), str(header["payload_sha256"])
        found_kind, meta = header["kind"], dict(header["meta"])
    except (ValueError, KeyError, TypeError) as exc:
        raise refuse(f"its header is corrupted ({exc})") from None
    if found_kind != kind:
        raise refuse(f"it holds a {found_kind!r}, not a {kind!r}")
    payload = blob[header_end:]
    if len(payload) != payload_bytes:
        state = "truncated" if len(payload) < payload_bytes else "longer than written"
        raise refuse(f"it is {state} (payload of {len(payload)} bytes, {payload_bytes} written)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise refuse("its payload checksum does not match (corrupted)")
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as exc:
        # only reachable for a payload written with a matching checksum by something else
        raise refuse(f"its payload does not unpickle as plain tensors ({exc})") from None
    return state, meta

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


def layers_from_state(state: dict[str, Any], device: torch.device | str) -> list:
    return [_layer_from_state(layer_state, device) for layer_state in state["layers"]]


def _quantized_layer_state(layer: QuantizedKVLayer) -> dict[str, Any]:
    """Settings and every held tensor, as plain tensors and numbers."""
    state: dict[str, Any] = {"settings": dataclasses.asdict(layer.settings), "initialized": layer.is_initialized}
    if layer.is_initialized:
        state.update(
            dtype=dtype_name(layer.dtype),
            length=layer.get_seq_length(),
            shape=[layer.batch_size, layer.num_heads, layer.head_dim, layer.value_head_dim],
            sink_keys=layer.sink_keys, sink_values=layer.sink_values,
            residual_keys=layer.residual_keys, residual_values=layer.residual_values,
            keys=layer.quantized_keys.snapshot_state(), values=layer.quantized_values.snapshot_state(),
        )  # fmt: skip
    return state


def _quantized_layer_from_state(state: dict[str, Any], device: torch.device | str) -> QuantizedKVLayer:
    layer = QuantizedKVLayer(LayerSettings(**state["settings"]))
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


def _layer_state(idx: int, layer: Any) -> dict[str, Any]:
    if isinstance(layer, QuantizedKVLayer):
        return {"kind": "quantized", **_quantized_layer_state(layer)}
    if isinstance(layer, DummyLayer):
        return {"kind": "dummy"}
    if isinstance(layer, DynamicLayer):  # DynamicSlidingWindowLayer included
        state = {"kind": "dynamic", "initialized": layer.is_initialized, "keys": layer.keys, "values": layer.values}
        if isinstance(layer, DynamicSlidingWindowLayer):
            state.update(kind="sliding", sliding_window=layer.sliding_window, cumulative_length=layer.cumulative_length)
        return state
    raise ValueError(f"layer {idx} is a {type(layer).__name__}, which `save` does not know how to write")


def _layer_from_state(state: dict[str, Any], device: torch.device | str) -> Any:
    kind = state["kind"]
    if kind == "quantized":
        return _quantized_layer_from_state(state, device)
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
        heads, head_dim = layer.settings.expected_num_heads, layer.settings.expected_head_dim
        if layer.is_initialized:
            heads, head_dim = layer.num_heads, layer.head_dim
        return ("quantized", heads, head_dim, layer.key_bits, layer.value_bits)
    if isinstance(layer, DynamicSlidingWindowLayer):
        return ("sliding", layer.sliding_window)
    return (type(layer).__name__,)


def check_same_layout(path: str, expected: list, loaded: list) -> None:
    if len(expected) != len(loaded):
        raise ValueError(f"snapshot {path!r} holds {len(loaded)} layers but this model has {len(expected)}")
    for idx, (want, got) in enumerate(zip(expected, loaded)):
        a, b = _layout_of(want), _layout_of(got)
        if len(a) != len(b) or any(x is not None and y is not None and x != y for x, y in zip(a, b)):
            raise ValueError(
                f"snapshot {path!r} is from another model or setting: layer {idx} was saved as {b} "
                "(kind, kv heads, head_dim, key bits, value bits) but this model and config give " + str(a)
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
