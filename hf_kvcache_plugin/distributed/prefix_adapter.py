"""``PrefixStoreAdapter``: the coordinator's ``LocalEntries`` over this package's ``PrefixStore``.

Entries leave and enter as the quantized blocks they are (codes, scales and
zeros of every layer, with their bit width, group size, axis and logical
shape): a migrated entry is byte-for-byte the entry its source held.

Listing and removal go through ``PrefixStore.entry_infos`` and
``PrefixStore.remove``: the adapter touches no private member of the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..reuse.prefix_store import PrefixEntry, PrefixStore
from ..quantization import QuantizedTensor
from .local_entries import EntryInfo

__all__ = ["PrefixStoreAdapter"]


class PrefixStoreAdapter:
    """``LocalEntries`` over a ``PrefixStore``; see the module docstring."""

    def __init__(self, prefix_store: PrefixStore):
        if not isinstance(prefix_store, PrefixStore):
            raise ValueError(f"`prefix_store` has to be a PrefixStore but got {type(prefix_store).__name__}")
        self.prefix_store = prefix_store

    @property
    def used_bytes(self) -> int:
        return self.prefix_store.used_bytes

    def entry_infos(self) -> list[EntryInfo]:
        return [EntryInfo(i.key, i.parent, i.nbytes, i.last_used, i.pins > 0) for i in self.prefix_store.entry_infos()]

    def export_entries(self, keys: Sequence[bytes]) -> list[dict[str, Any]]:
        payloads = []
        for key in keys:
            entry = self.prefix_store.get(key)
            if entry is None:
                continue
            payloads.append(
                {
                    "key": entry.key,
                    "parent": entry.parent,
                    "num_tokens": entry.num_tokens,
                    "keys": [q.to_dict(compact=True) for q in entry.keys],
                    "values": [q.to_dict(compact=True) for q in entry.values],
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
                keys=tuple(QuantizedTensor.from_dict(q) for q in p["keys"]),
                values=tuple(QuantizedTensor.from_dict(q) for q in p["values"]),
            )
            # one by one: a refused entry (parent evicted meanwhile) does not refuse unrelated ones
            stored += self.prefix_store.put(entry)
        return stored

    def remove_entries(self, keys: Sequence[bytes]) -> int:
        return self.prefix_store.remove(keys, reason="coordinator")
