"""What the coordinator needs from this process's prefix entries, as a small Protocol (``LocalEntries``).

The coordinator never looks inside an entry: it lists keys with their sizes,
exports entries as payloads (mappings of tensors and plain values, the
quantized blocks exactly as stored), imports payloads another process
exported, and removes entries. ``PrefixStoreAdapter`` (in ``prefix_adapter``)
implements it over ``PrefixStore``; tests use small stand-ins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["EntryInfo", "LocalEntries", "chains_parent_first", "root_of"]


@dataclass(frozen=True)
class EntryInfo:
    """One stored chunk as the coordinator sees it."""

    key: bytes
    parent: bytes | None  # the previous chunk's key; None for a prompt's first chunk
    nbytes: int
    last_used: int  # larger is more recent (a store tick, not a time)
    pinned: bool = False


@runtime_checkable
class LocalEntries(Protocol):
    """This process's prefix entries, as far as the coordinator uses them (listed, exported, imported, removed)."""

    def entry_infos(self) -> list[EntryInfo]:
        """Every stored entry (a snapshot)."""

    def export_entries(self, keys: Sequence[bytes]) -> list[dict[str, Any]]:
        """Payloads of the stored ``keys`` (missing ones skipped), in the order given."""

    def import_entries(self, payloads: Sequence[dict[str, Any]]) -> int:
        """Store exported payloads, parents before children; returns how many are now stored."""

    def remove_entries(self, keys: Sequence[bytes]) -> int:
        """Remove ``keys`` (and what extends them); pinned ones stay. Returns bytes freed."""


def root_of(key: bytes, parents: dict[bytes, bytes | None]) -> bytes:
    """The first chunk of ``key``'s chain: its placement key."""
    seen = 0
    while parents.get(key) is not None:
        key = parents[key]
        seen += 1
        if seen > len(parents):
            raise ValueError("entry parents form a cycle")
    return key


def chains_parent_first(infos: Sequence[EntryInfo]) -> dict[bytes, list[EntryInfo]]:
    """Entries grouped by root key, each group ordered so that every parent precedes its children."""
    parents = {info.key: info.parent for info in infos}
    depth: dict[bytes, int] = {}

    def depth_of(key: bytes) -> int:
        chain = []
        while key not in depth and parents.get(key) in parents:
            chain.append(key)
            key = parents[key]
        base = depth.setdefault(key, 0)
        for offset, member in enumerate(reversed(chain), start=1):
            depth[member] = base + offset
        return depth[chain[0]] if chain else base

    groups: dict[bytes, list[EntryInfo]] = {}
    for info in infos:
        groups.setdefault(root_of(info.key, parents), []).append(info)
    for members in groups.values():
        members.sort(key=lambda info: (depth_of(info.key), info.key))
    return groups
