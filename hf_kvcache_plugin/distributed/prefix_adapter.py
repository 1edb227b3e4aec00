"""``PrefixStoreAdapter``: the coordinator's ``EntryStore`` over this package's ``PrefixStore``.

Entries leave and enter as the quantized blocks they are (codes, scales and
zeros of every layer, with their bit width, group size, axis and logical
shape): a migrated entry is byte-for-byte the entry its source held.

Listing and removal go through ``PrefixStore.entry_infos`` and
``PrefixStore.remove``: the adapter touches no private member of the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..prefix_store import PrefixEntry, PrefixStore
from ..quantization import QuantizedTensor
from .local_store import EntryInfo

__all__ = ["PrefixStoreAdapter"]


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A tensor that owns just its bytes (``torch.save`` of a view writes the whole storage)."""
    t = t.detach().to("cpu")
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t.contiguous()


def _quantized_to_payload(q: QuantizedTensor) -> dict[str, Any]:
    return {
        "data": _compact(q.data),
        "scale": _compact(q.scale),
        "zero": None if q.zero is None else _compact(q.zero),
        "bits": q.bits,
        "group_size": q.group_size,
        "axis": q.axis,
        "shape": tuple(q.shape),
        "dtype": q.dtype,
    }


def _quantized_from_payload(p: dict[str, Any]) -> QuantizedTensor:
    return QuantizedTensor(
        data=p["data"],
        scale=p["scale"],
        zero=p["zero"],
        bits=int(p["bits"]),
        group_size=int(p["group_size"]),
        axis=int(p["axis"]),
        shape=tuple(p["shape"]),
        dtype=p["dtype"],
    )


class PrefixStoreAdapter:
    """``EntryStore`` over a ``PrefixStore``; see the module docstring."""

    def __init__(self, store: PrefixStore):
        if not isinstance(store, PrefixStore):
            raise ValueError(f"`store` has to be a PrefixStore but got {type(store).__name__}")
        self.store = store

    @property
    def used_bytes(self) -> int:
        return self.store.used_bytes

    def entry_infos(self) -> list[EntryInfo]:
        return [EntryInfo(i.key, i.parent, i.nbytes, i.last_used, i.pins > 0) for i in self.store.entry_infos()]

    def export_entries(self, keys: Sequence[bytes]) -> list[dict[str, Any]]:
        payloads = []
        for key in keys:
            entry = self.store.get(key)
            if entry is None:
                continue
            payloads.append(
                {
                    "key": entry.key,
                    "parent": entry.parent,
                    "num_tokens": entry.num_tokens,
                    "keys": [_quantized_to_payload(q) for q in entry.keys],
                    "values": [_quantized_to_payload(q) for q in entry.values],
                }
            )
        return payloads

    def import_entries(self, payloads: Sequence[dict[str, Any]]) -> int:
        stored = 0
        for p in payloads:
            entry = PrefixEntry(
                key=bytes(p["key"]),
                parent=None if p["parent"] is None else bytes(p["parent"]),
                num_tokens=int(p["num_tokens"]),
                keys=tuple(_quantized_from_payload(q) for q in p["keys"]),
                values=tuple(_quantized_from_payload(q) for q in p["values"]),
            )
            # one by one: a refused entry (parent evicted meanwhile) does not refuse unrelated ones
            stored += self.store.put(entry)
        return stored

    def remove_entries(self, keys: Sequence[bytes]) -> int:
        return self.store.remove(keys, reason="coordinator")
