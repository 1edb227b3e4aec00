"""Snapshot files: a safetensors file (tensors and a JSON header, no pickle), checked whole before use.

``write_snapshot(path, kind, state, meta)`` takes a state of tensors,
numbers, strings, ``None``, lists and dicts. Its tensors become the file's
tensors; the rest is JSON in the safetensors ``__metadata__``::

    format          "hf_kvcache_plugin.snapshot"
    format_version  "2"
    kind            what the state is (e.g. "QuantizedKVCache")
    state           the state as JSON, each tensor replaced by {"__tensor__": name, "order": [...]}
    meta            free-form JSON
    sha256          of every tensor's name and bytes, in name order

A tensor is written in its memory order (``order``: its dims sorted by
stride) and read back with the same strides, so a loaded cache lays out its
blocks as the saved one did. ``read_snapshot`` refuses a truncated, padded,
corrupted, foreign or older file as a whole with a ``SnapshotError``: the
safetensors parser checks that the header covers the file exactly, then the
format, version, kind and checksum are verified before any state is built.
Nothing in the file is executed. Writes go to a temporary file in the same
directory, renamed over the target: a crash leaves the old file or none.

Format 1 (``torch.save`` in an ``HFKVSNAP`` envelope) is refused with a
``SnapshotError`` that says so; load it with the version that wrote it and
save it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from .errors import KVCacheError

__all__ = ["SNAPSHOT_FORMAT_VERSION", "SnapshotError", "read_snapshot", "write_snapshot"]

SNAPSHOT_FORMAT_VERSION = 2
_FORMAT = "hf_kvcache_plugin.snapshot"
_LEGACY_MAGIC = b"HFKVSNAP"  # format 1
_TENSOR = "__tensor__"
_HEADER_LENGTH = struct.Struct("<Q")  # safetensors: u64 little-endian header size, then the JSON header
_MAX_HEADER_BYTES = 64 << 20


class SnapshotError(KVCacheError, ValueError):
    """A snapshot that cannot be trusted or does not fit: truncated, corrupted, of another kind, format or
    model, or inconsistent inside. Nothing was loaded."""

    code = "snapshot_invalid"


def write_snapshot(path: str | Path, kind: str, state: Any, meta: dict[str, Any] | None = None) -> int:
    """Write ``state`` atomically (see the module docstring); returns the file size in bytes."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, tensors, set())
    metadata = {
        "format": _FORMAT,
        "format_version": str(SNAPSHOT_FORMAT_VERSION),
        "kind": kind,
        "state": json.dumps(structure, sort_keys=True),
        "meta": json.dumps(meta or {}, sort_keys=True),
        "sha256": _digest(tensors),
    }
    blob = safetensors.torch.save(tensors, metadata)
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

    def refuse(why: str) -> SnapshotError:
        return SnapshotError(f"snapshot {str(path)!r} is refused: {why}; nothing was loaded")

    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise refuse(f"it cannot be read ({exc})") from None
    if blob.startswith(_LEGACY_MAGIC):
        raise refuse(
            f"it is in format 1 (torch.save in an {_LEGACY_MAGIC.decode()} envelope), written by an earlier "
            f"version; this version reads format {SNAPSHOT_FORMAT_VERSION} (safetensors) only: load it with the "
            "version that wrote it and save it again"
        )
    metadata = _metadata(blob, refuse)
    if metadata.get("format") != _FORMAT:
        raise refuse(f"it is a safetensors file but not a hf_kvcache_plugin snapshot (format {metadata.get('format')!r})")
    if metadata.get("format_version") != str(SNAPSHOT_FORMAT_VERSION):
        raise refuse(
            f"format version {metadata.get('format_version')!r} is not supported (this version reads "
            f"{SNAPSHOT_FORMAT_VERSION})"
        )
    if metadata.get("kind") != kind:
        raise refuse(f"it holds a {metadata.get('kind')!r}, not a {kind!r}")
    try:
        tensors = safetensors.torch.load(blob)
    except Exception as exc:  # noqa: BLE001 - the parser's errors on untrusted bytes are all one refusal
        raise refuse(f"it is truncated or corrupted ({exc})") from None
    if _digest(tensors) != metadata.get("sha256"):
        raise refuse("its tensors' checksum does not match (corrupted)")
    try:
        structure, meta = json.loads(metadata["state"]), json.loads(metadata["meta"])
        used: set[str] = set()
        state = _unflatten(structure, tensors, used)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise refuse(f"its state does not match its tensors ({type(exc).__name__}: {exc})") from None
    if used != set(tensors) or not isinstance(meta, dict):
        raise refuse(f"it holds tensors its state does not use ({sorted(set(tensors) - used)[:5]}) or bad meta")
    return state, meta


def _metadata(blob: bytes, refuse) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header, read before any tensor is decoded."""
    if len(blob) < _HEADER_LENGTH.size:
        raise refuse(f"it is truncated ({len(blob)} bytes, shorter than the {_HEADER_LENGTH.size}-byte preamble)")
    (length,) = _HEADER_LENGTH.unpack_from(blob)
    if length > min(_MAX_HEADER_BYTES, len(blob) - _HEADER_LENGTH.size):
        raise refuse(f"it is truncated or not a snapshot (header of {length} bytes, file of {len(blob)})")
    try:
        header = json.loads(blob[_HEADER_LENGTH.size : _HEADER_LENGTH.size + length])
        metadata = header["__metadata__"]
    except (ValueError, KeyError, TypeError) as exc:
        raise refuse(f"it is not a hf_kvcache_plugin snapshot: its header is corrupted or foreign ({exc!r})") from None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise refuse("its header's metadata is not a mapping of strings")
    return metadata


def _flatten(value: Any, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` (each in memory order, owning its bytes)."""
    if isinstance(value, torch.Tensor):
        order = sorted(range(value.dim()), key=lambda d: (-value.stride(d), d))
        t = value.detach().to("cpu").permute(order).contiguous()
        pointer = t.untyped_storage().data_ptr()
        # safetensors writes each tensor's own bytes and refuses tensors that share storage
        if pointer in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        name = str(len(tensors))
        tensors[name] = t
        return {_TENSOR: name, "order": order}
    if isinstance(value, dict):
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
            raise ValueError(f"snapshot state keys have to be strings or ints but got {list(value)[:5]}")
        return {str(k): _flatten(v, tensors, storages) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_flatten(v, tensors, storages) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"a snapshot state holds tensors, numbers, strings, lists and dicts, not {type(value).__name__}")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    if isinstance(value, dict):
        if _TENSOR in value:
            name, order = value[_TENSOR], value["order"]
            t = tensors[name]
            if name in used or sorted(order) != list(range(t.dim())):
                raise ValueError(f"tensor {name!r} is referenced twice or has a bad dim order {order!r}")
            used.add(name)
            inverse = sorted(range(t.dim()), key=lambda d: order[d])
            return t.permute(inverse)
        return {k: _unflatten(v, tensors, used) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, tensors, used) for v in value]
    return value


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        sha.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        if t.numel():
            sha.update(t.reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()
