"""Bytes on the wire: JSON for control messages, ``torch.save`` for entries.

Entries are loaded with ``weights_only=True``: a peer's payload can only
produce tensors and plain values, never run code.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["decode_entries", "decode_json", "encode_entries", "encode_json"]


def encode_json(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode_json(data: bytes) -> Any:
    return json.loads(data)


def encode_entries(payloads: Sequence[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    torch.save(list(payloads), buffer)
    return buffer.getvalue()


def decode_entries(data: bytes) -> list[dict[str, Any]]:
    return torch.load(io.BytesIO(data), weights_only=True)
