"""Global eviction: how many bytes each process frees, and which of its entries go. Pure planning.

A cluster-wide reduction of R bytes is split in proportion to what each
process holds (a process cannot free more than it holds; what it cannot give
is spread over the others). Each process then removes, in order:

1. copies this process does not own that another live process also holds,
   then other replicas, then sole copies: a reduction loses as little of what
   the cluster can serve as it can;
2. within each group, the coldest (least recently used) first.

Removing a chunk removes the chunks that extend it (they are unreachable
without it); their bytes count towards the share. Pinned chunks, and chunks
a pinned chunk extends, stay.
"""

from __future__ import annotations

from collections.abc import Sequence

from .hash_ring import NodeId, node_order
from .local_entries import EntryInfo

__all__ = ["eviction_shares", "plan_local_eviction"]


def eviction_shares(target_bytes: int, used_bytes: dict[NodeId, int]) -> dict[NodeId, int]:
    """Bytes each node frees so that together they free ``target_bytes`` (or all they hold)."""
    if target_bytes < 0:
        raise ValueError(f"`target_bytes` has to be >= 0 but got {target_bytes}")
    shares = dict.fromkeys(used_bytes, 0)
    remaining = min(target_bytes, sum(used_bytes.values()))
    open_nodes = sorted((n for n, used in used_bytes.items() if used > 0), key=node_order)
    # water-filling: proportional split, capped at what a node holds, the excess goes round again
    while remaining > 0 and open_nodes:
        held = {n: used_bytes[n] - shares[n] for n in open_nodes}
        total = sum(held.values())
        given = 0
        for n in open_nodes:
            extra = min(held[n], remaining * held[n] // total)
            shares[n] += extra
            given += extra
        if given == 0:
            # integer rounding left a few bytes: the largest holders take one byte each
            for n in sorted(open_nodes, key=lambda n: (-held[n], node_order(n)))[:remaining]:
                shares[n] += 1
                given += 1
        remaining -= given
        open_nodes = [n for n in open_nodes if shares[n] < used_bytes[n]]
    return shares


def plan_local_eviction(
    entries: Sequence[EntryInfo], target_bytes: int, replicated: set[bytes], owned: set[bytes] | None = None
) -> list[bytes]:
    """Keys to remove (each removal also takes what extends it) to free at least ``target_bytes``.

    ``replicated``: keys another live process holds too; ``owned``: keys whose chain this process owns on
    the ring (None: all).
    """
    children: dict[bytes, list[bytes]] = {}
    by_key = {info.key: info for info in entries}
    for info in entries:
        if info.parent is not None:
            children.setdefault(info.parent, []).append(info.key)

    def subtree(key: bytes) -> list[bytes]:
        out, stack = [], [key]
        while stack:
            k = stack.pop()
            out.append(k)
            stack.extend(children.get(k, ()))
        return out

    def group(key: bytes) -> int:
        if key not in replicated:
            return 2
        return 1 if owned is None or key in owned else 0

    order = sorted(entries, key=lambda info: (group(info.key), info.last_used, info.key))
    removed: set[bytes] = set()
    victims: list[bytes] = []
    freed = 0
    for info in order:
        if freed >= target_bytes:
            break
        if info.key in removed:
            continue
        tree = subtree(info.key)
        if any(by_key[k].pinned for k in tree):
            continue
        victims.append(info.key)
        for k in tree:
            if k not in removed:
                removed.add(k)
                freed += by_key[k].nbytes
    return victims
