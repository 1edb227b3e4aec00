"""Snapshot files: a checked envelope around a ``torch.save`` payload.

Layout::

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

__all__ = ["SNAPSHOT_FORMAT_VERSION", "SnapshotError", "read_snapshot", "write_snapshot"]

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
