"""Processes of the cluster as the coordinator sees them, and which keys each one holds."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum

from ..config import PrefixStoreConfig
from .hash_ring import NodeId, check_node_id

__all__ = ["EntryDirectory", "EntryRecord", "NodeInfo", "NodeState"]


class NodeState(str, Enum):
    """ACTIVE: owns keys and serves. DRAINING: serves nothing new, hands its entries over. OFFLINE: gone."""

    ACTIVE = "active"
    DRAINING = "draining"
    OFFLINE = "offline"


@dataclass
class NodeInfo:
    """One node: its id (a process rank, or a name such as ``"node-1"``), where it runs (``address`` and
    ``port``, informational), its prefix-store capacity and its state."""

    node_id: NodeId
    address: str = ""
    capacity_mb: float = PrefixStoreConfig.max_size_mb
    state: NodeState = NodeState.ACTIVE
    port: int | None = None

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        if not isinstance(self.address, str):
            raise ValueError(f"`address` of node {self.node_id!r} has to be a string but got {self.address!r}")
        if self.port is not None and (
            not isinstance(self.port, int) or isinstance(self.port, bool) or not 1 <= self.port <= 65535
        ):
            raise ValueError(
                f"`port` of node {self.node_id!r} has to be an integer in [1, 65535] or None but got {self.port!r}"
            )
        if not isinstance(self.capacity_mb, (int, float)) or isinstance(self.capacity_mb, bool) or self.capacity_mb <= 0:
            raise ValueError(f"`capacity_mb` of node {self.node_id} has to be a number > 0 but got {self.capacity_mb!r}")
        try:
            self.state = NodeState(self.state)
        except ValueError:
            raise ValueError(
                f"`state` of node {self.node_id} has to be one of {[s.value for s in NodeState]} but got {self.state!r}"
            ) from None

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "state": self.state.value}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "NodeInfo":
        return cls(**json.loads(data))


@dataclass
class EntryRecord:
    """A stored prefix chunk somewhere in the cluster."""

    size_bytes: int
    holders: set[NodeId] = field(default_factory=set)


class EntryDirectory:
    """Key -> size and the nodes holding it; rebuilt per node from that node's published key set.

    Each node publishes its whole key set (not deltas), so a missed update
    never leaves the directory wrong for longer than the next one.
    """

    def __init__(self) -> None:
        self._records: dict[bytes, EntryRecord] = {}
        self._keys_of: dict[NodeId, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def get(self, key: bytes) -> EntryRecord | None:
        return self._records.get(key)

    def holders(self, key: bytes) -> set[NodeId]:
        record = self._records.get(key)
        return set() if record is None else set(record.holders)

    def keys_of(self, node_id: NodeId) -> set[bytes]:
        return set(self._keys_of.get(node_id, ()))

    def add(self, key: bytes, size_bytes: int, node_ids: Iterable[NodeId]) -> None:
        """Record that ``node_ids`` hold ``key`` (``size_bytes`` each)."""
        if not isinstance(size_bytes, int) or isinstance(size_bytes, bool) or size_bytes < 0:
            raise ValueError(f"`size_bytes` has to be an integer >= 0 but got {size_bytes!r}")
        record = self._records.setdefault(key, EntryRecord(size_bytes))
        record.size_bytes = size_bytes
        for node_id in node_ids:
            record.holders.add(node_id)
            self._keys_of.setdefault(node_id, set()).add(key)

    def discard(self, key: bytes, node_id: NodeId) -> None:
        record = self._records.get(key)
        if record is None:
            return
        record.holders.discard(node_id)
        self._keys_of.get(node_id, set()).discard(key)
        if not record.holders:
            del self._records[key]

    def replace_node(self, node_id: NodeId, sizes: dict[bytes, int]) -> None:
        """Set the whole key set of ``node_id`` (its latest published state)."""
        for key in self.keys_of(node_id) - set(sizes):
            self.discard(key, node_id)
        for key, size in sizes.items():
            self.add(key, size, (node_id,))

    def drop_node(self, node_id: NodeId) -> None:
        self.replace_node(node_id, {})

    def bytes_of(self, node_id: NodeId) -> int:
        return sum(self._records[k].size_bytes for k in self._keys_of.get(node_id, ()))
