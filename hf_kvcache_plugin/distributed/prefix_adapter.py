"""``PrefixStoreAdapter``: the coordinator's ``LocalEntries`` over this package's ``PrefixStore``.

Entries leave and enter as the quantized blocks they are (codes, scales and
zeros of every layer, with their bit width, group size, axis and logical
shape): a migrated entry is byte-for-byte the entry its source held.

Listing and removal go through ``PrefixStore.entry_infos`` and
``PrefixStore.remove``: the adapter touches no private member of the store.

Imported payloads come from other processes, so each one is checked before
anything is stored: it has to build a ``PrefixEntry``, and pass every check
in ``checks`` (by default the serving layer's insert guard,
``entry_problem``: no non-finite scales; ``attach_coordinator`` puts the
model's ``EntryLayout`` first), then, for a batch the exchange samples, the
``EntryVerifier``'s recomputation. One bad entry refuses the whole batch
with a ``PayloadError`` before any of it is stored: the sender is
misbehaving.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..reuse.prefix_store import PrefixEntry, PrefixStore
from ..quantization import QuantizedTensor
from ..resilience.degradation import entry_problem
from .local_entries import EntryInfo
from .payloads import PayloadError

EntryCheck = Callable[[PrefixEntry], "str | None"]

__all__ = ["PrefixStoreAdapter"]


class PrefixStoreAdapter:
    """``LocalEntries`` over a ``PrefixStore``; see the module docstring."""

    def __init__(self, prefix_store: PrefixStore, checks: Sequence[EntryCheck] = (entry_problem,)):
        if not isinstance(prefix_store, PrefixStore):
            raise ValueError(f"`prefix_store` has to be a PrefixStore but got {type(prefix_store).__name__}")
        self.prefix_store = prefix_store
        self.checks = tuple(checks)

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

    def import_entries(
        self, payloads: Sequence[dict[str, Any]], verify: Callable[[list[PrefixEntry]], None] | None = None
    ) -> int:
        """Store a peer's payloads (all checked first); raises ``PayloadError`` naming the first bad one.
        ``verify`` sees the whole batch as entries before any is stored, and raises a ``PayloadError`` to refuse
        it (``EntryVerifier.check``)."""
        entries = [self._entry(i, p) for i, p in enumerate(payloads)]
        if verify is not None:
            verify(entries)
        stored = 0
        for entry in entries:
            # one by one: a refused entry (parent evicted meanwhile) does not refuse unrelated ones
            stored += self.prefix_store.put(entry)
        return stored

    def _entry(self, index: int, payload: Any) -> PrefixEntry:
        try:
            entry = PrefixEntry(
                key=bytes(payload["key"]),
                parent=None if payload["parent"] is None else bytes(payload["parent"]),
                num_tokens=int(payload["num_tokens"]),
                keys=tuple(QuantizedTensor.from_dict(q) for q in payload["keys"]),
                values=tuple(QuantizedTensor.from_dict(q) for q in payload["values"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
            raise PayloadError(f"payload {index} is not an entry ({type(exc).__name__}: {str(exc)[:200]})") from None
        if entry.num_tokens != self.prefix_store.chunk_size:
            raise PayloadError(f"payload {index} holds {entry.num_tokens} tokens; chunks here hold "
                               f"{self.prefix_store.chunk_size}")
        for check in self.checks:
            problem = check(entry)
            if problem is not None:
                raise PayloadError(f"payload {index} refused: {problem}")
        return entry

    def remove_entries(self, keys: Sequence[bytes]) -> int:
        return self.prefix_store.remove(keys, reason="coordinator")
