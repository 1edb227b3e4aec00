"""Bytes on the wire: JSON for control messages, ``torch.save`` for entries.

Entries are loaded with ``weights_only=True`` (onto the CPU): a peer's payload
can only produce tensors and plain values, never run code. Decoding raises
``PayloadError`` and nothing else, whatever the bytes (tests fuzz this).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["PayloadError", "decode_entries", "decode_json", "encode_entries", "encode_json"]


class PayloadError(ValueError):
    """Bytes that do not decode to a message (corrupt, truncated, or not made by ``encode_*``)."""


def encode_json(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode_json(data: bytes) -> Any:
    try:
        # NaN/Infinity are not JSON; nothing this package sends holds them
        return json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise PayloadError(f"not a JSON message: {exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a message may carry")


def encode_entries(payloads: Sequence[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    torch.save(list(payloads), buffer)
    return buffer.getvalue()


def decode_entries(data: bytes) -> list[dict[str, Any]]:
    """The list of entry payloads ``encode_entries`` wrote; their contents are checked by the importer."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unusual pickle protocol" and the like: the bytes are refused anyway
            loaded = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch's unpickler raises whatever its parser hits (struct.error,
        # UnpicklingError, RuntimeError, zipfile errors, ...; found by fuzzing): all of it means "not a batch"
        raise PayloadError(f"not an entry batch ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(loaded, list) or not all(isinstance(p, dict) for p in loaded):
        raise PayloadError(f"an entry batch is a list of mappings but got {type(loaded).__name__}")
    return loaded
