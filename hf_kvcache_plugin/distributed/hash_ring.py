"""``ConsistentHashRing``: which processes own a key, stable under membership changes.

Every node gets ``round(virtual_nodes * weight)`` points on a 64-bit ring; a
key belongs to the first distinct nodes met walking clockwise from the key's
point. Adding or removing one node only moves the keys of the arcs it gains or
loses (about 1/N of them), and weights proportional to capacity give each node
a share of keys proportional to its capacity.

Positions come from BLAKE2b, never Python's ``hash()``: every process, on every
machine and after restarts, computes the same ring and the same owners.

A node id is a process rank (an ``int`` >= 0) or a name (a non-empty ``str``,
e.g. ``"node-1"``); rank 1 and the name ``"1"`` are different nodes with
different points. ``ConsistentHash`` (the specification's name) is
``ConsistentHashRing``.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable
from typing import Union

__all__ = ["ConsistentHash", "ConsistentHashRing", "NodeId", "check_node_id", "node_order", "ring_position"]

_POSITION_BYTES = 8

NodeId = Union[int, str]


def check_node_id(node_id: object) -> None:
    """A rank (``int`` >= 0) or a name (non-empty ``str``), or a ``ValueError`` naming the value."""
    is_rank = isinstance(node_id, int) and not isinstance(node_id, bool) and node_id >= 0
    if not is_rank and not (isinstance(node_id, str) and node_id):
        raise ValueError(
            f"`node_id` has to be a process rank (an integer >= 0) or a node name (a non-empty string) but got "
            f"{node_id!r}"
        )


def node_order(node_id: NodeId) -> tuple[bool, NodeId]:
    """Sort key over mixed ids: ranks in numeric order, then names in text order."""
    return isinstance(node_id, str), node_id


def ring_position(data: bytes | str) -> int:
    """A point on the ring in [0, 2**64): a content hash, the same in every process."""
    if isinstance(data, str):
        data = data.encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=_POSITION_BYTES).digest(), "big")


class ConsistentHashRing:
    """Consistent-hash ring with weighted virtual nodes; lookups are a bisect, O(log V).

    Args:
        virtual_nodes: points per node of weight 1.0 (more points: a more even split).
        nodes: optional ``{node_id: weight}`` to start with.
    """

    def __init__(self, virtual_nodes: int = 128, nodes: dict[NodeId, float] | None = None):
        if not isinstance(virtual_nodes, int) or isinstance(virtual_nodes, bool) or virtual_nodes < 1:
            raise ValueError(f"`virtual_nodes` has to be a positive integer but got {virtual_nodes!r}")
        self.virtual_nodes = virtual_nodes
        self._weights: dict[NodeId, float] = {}
        self._positions: list[int] = []  # sorted
        self._owners: list[NodeId] = []  # node of each position
        for node_id, weight in (nodes or {}).items():
            self.add_node(node_id, weight)

    # ------------------------------------------------------------------ membership
    @property
    def nodes(self) -> list[NodeId]:
        return sorted(self._weights, key=node_order)

    @property
    def weights(self) -> dict[NodeId, float]:
        return dict(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._weights

    def add_node(self, node_id: NodeId, weight: float = 1.0) -> None:
        """Place ``node_id`` with ``round(virtual_nodes * weight)`` points (at least one)."""
        check_node_id(node_id)
        if node_id in self._weights:
            raise ValueError(f"node {node_id} is already on the ring")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            raise ValueError(f"`weight` of node {node_id} has to be a number > 0 but got {weight!r}")
        self._weights[node_id] = float(weight)
        # repr: a rank's points are those of ``node:3#v``, a name's those of ``node:'node-1'#v``
        points = [
            (ring_position(f"node:{node_id!r}#{v}"), node_id) for v in range(max(1, round(self.virtual_nodes * weight)))
        ]
        # sorting (position, node) breaks the rare tie of two nodes on one point the same way everywhere
        merged = sorted([*zip(self._positions, self._owners), *points], key=lambda p: (p[0], node_order(p[1])))
        self._positions = [p for p, _ in merged]
        self._owners = [o for _, o in merged]

    def remove_node(self, node_id: NodeId) -> None:
        if node_id not in self._weights:
            raise ValueError(f"node {node_id} is not on the ring; nodes are {self.nodes}")
        del self._weights[node_id]
        kept = [(p, o) for p, o in zip(self._positions, self._owners) if o != node_id]
        self._positions = [p for p, _ in kept]
        self._owners = [o for _, o in kept]

    def copy(self) -> "ConsistentHashRing":
        ring = ConsistentHashRing(self.virtual_nodes)
        ring._weights = dict(self._weights)
        ring._positions = list(self._positions)
        ring._owners = list(self._owners)
        return ring

    # ------------------------------------------------------------------ lookup
    def walk(self, key: bytes | str) -> Iterable[NodeId]:
        """Every node once, in ring order from ``key``'s point: the key's preference list."""
        if not self._positions:
            return
        start = bisect.bisect_right(self._positions, ring_position(key))
        seen: set[NodeId] = set()
        total = len(self._positions)
        for step in range(total):
            owner = self._owners[(start + step) % total]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self._weights):
                    return

    def get_nodes(self, key: bytes | str, n: int = 1) -> list[NodeId]:
        """The ``n`` distinct nodes that own ``key`` (fewer if the ring has fewer), primary first."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"`n` has to be a positive integer but got {n!r}")
        owners = []
        for node_id in self.walk(key):
            owners.append(node_id)
            if len(owners) == n:
                break
        return owners

    def get_node(self, key: bytes | str) -> NodeId:
        """The primary owner of ``key``."""
        owners = self.get_nodes(key, 1)
        if not owners:
            raise ValueError("the ring has no nodes")
        return owners[0]


# The specification's name for the same class.
ConsistentHash = ConsistentHashRing
