"""``ClusterView``: the processes of the launch as this one sees them, and which of them own keys.

It owns

- the ``NodeInfo`` of every known process, this one's included (``node``);
- the ring: the consistent-hash ring of the processes that own keys (ACTIVE
  ones not cut off by an open breaker, weighted by capacity), and so the
  placement of a key on ``replication_factor`` of them;
- this process's presence in the c10d store: its announcement (its node
  record and the ``joined`` counter), keeping that record current, and
  discovering ranks that announced themselves later or came back;
- what it knows of each peer's liveness: reachable (its breaker is not open),
  left (it declared itself OFFLINE), ``peers_alive`` for the health check.

Which process holds which chunk (the ``EntryDirectory``) is not kept here but
by ``entry_exchange``: when a process leaves the ring for good (gone, or cut off
by its breaker) the view calls ``on_node_gone`` so that what it held is
forgotten there too.

Without a transport (one process) the view is what ``register_node`` put in it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import pybreaker

from ..config import DistributedConfig
from .hash_ring import ConsistentHashRing, NodeId, node_order
from .nodes import NodeInfo, NodeState
from .payloads import PayloadError
from .transport import StoreTransport
from .wire import parse_node

__all__ = ["ClusterView"]

logger = logging.getLogger(__name__)


class ClusterView:
    """This process's view of the cluster; see the module docstring.

    ``counters`` is the coordinator's, so that ``stats()`` shows ring changes too. ``config`` is read when
    used (virtual nodes, replication factor, startup timeout), as the coordinator's own settings are.
    """

    def __init__(
        self,
        local_node: NodeInfo,
        config: DistributedConfig,
        transport: StoreTransport | None,
        counters: Counter[str],
        on_node_gone: Callable[[NodeId], None] | None = None,
    ):
        self.node = local_node
        self.config = config
        self.transport = transport
        self.counters = counters
        self.on_node_gone = on_node_gone
        self.nodes: dict[NodeId, NodeInfo] = {local_node.node_id: local_node}
        self.ring = ConsistentHashRing(self.config.virtual_nodes)
        # set once this process announced itself (``announce``): from then on its node record, key set and
        # eviction orders go to the store
        self.announced = False
        self.refresh_ring()

    @property
    def node_id(self) -> NodeId:
        return self.node.node_id

    @property
    def replication_factor(self) -> int:
        return self.config.replication_factor

    def placement(self, key: bytes | str) -> list[NodeId]:
        """The processes that own ``key`` (a chain's first chunk key), primary first."""
        return self.ring.get_nodes(key, self.replication_factor)

    # ------------------------------------------------------------------ peers
    def peers(self) -> list[int]:
        """Known ranks of the launch other than this one (none without a transport)."""
        if self.transport is None:
            return []
        return [p for p in range(self.transport.world_size) if p != self.node_id and p in self.nodes]

    def present_peers(self) -> list[int]:
        """Known peers that have not left."""
        return [p for p in self.peers() if self.nodes[p].state != NodeState.OFFLINE]

    def peers_to_hear(self) -> list[int]:
        """Present peers whose breaker lets a call through: the ones whose messages are waited for."""
        return [p for p in self.present_peers() if self.transport.may_call(p)]

    def reachable(self, node_id: NodeId) -> bool:
        if node_id == self.node_id:
            return True
        if self.transport is None:
            return self.nodes.get(node_id, NodeInfo(node_id, state=NodeState.OFFLINE)).state != NodeState.OFFLINE
        return node_id in self.nodes and self.transport.breaker_state(node_id) != pybreaker.STATE_OPEN

    def peers_alive(self) -> dict[str, bool]:
        """``{"rank<n>": reachable}`` for every known peer that has not left: False while its breaker is open
        (its prompts are served here). Empty without a transport. For ``serving.peers_check``."""
        if self.transport is None:
            return {}
        return {f"rank{p}": self.transport.breaker_state(p) != pybreaker.STATE_OPEN for p in self.present_peers()}

    def peer_left(self, peer: int) -> bool:
        """Whether ``peer``'s record in the store says it left (read while waiting for its messages)."""
        data = self.transport.read_or_none(self.transport.key("node", peer), peer)
        return data is not None and self._node_record(peer, data).state == NodeState.OFFLINE

    def _node_record(self, peer: int, data: bytes) -> NodeInfo:
        """``peer``'s record as it posted it; a malformed one counts against it and reads as "no news"."""
        try:
            return parse_node(data, peer)
        except PayloadError as exc:
            self.transport.reject(peer, self.transport.key("node", peer), str(exc))
            return self.nodes.get(peer, NodeInfo(peer, state=NodeState.OFFLINE))

    def note_missed(self, peer: int, *, left: bool) -> None:
        """A message from ``peer`` did not come: one that left is OFFLINE from now on, and the ring drops it
        (or a peer whose breaker has just opened)."""
        if left:
            self.nodes[peer].state = NodeState.OFFLINE
        if left or self.transport.breaker_state(peer) == pybreaker.STATE_OPEN:
            self.refresh_ring()

    def absorb_node(self, peer: int, node: NodeInfo) -> None:
        """Take ``peer``'s own record of itself (from its round view)."""
        known = self.nodes.get(peer)
        self.nodes[peer] = node
        if known is None or known.state != node.state:
            logger.info("rank %d sees rank %d as %s", self.node_id, peer, node.state.value)

    # ------------------------------------------------------------------ ring
    def refresh_ring(self) -> None:
        """Ring = ACTIVE processes not cut off by an open breaker, weighted by capacity."""
        largest = max(info.capacity_mb for info in self.nodes.values())
        members = {
            n: info.capacity_mb / largest
            for n, info in self.nodes.items()
            if info.state == NodeState.ACTIVE and self.reachable(n)
        }
        if members == self.ring.weights:
            return
        before = set(self.ring.nodes)
        ring = ConsistentHashRing(self.config.virtual_nodes)
        for n in sorted(members, key=node_order):
            ring.add_node(n, members[n])
        self.ring = ring
        for gone in before - set(members):
            if not self.reachable(gone) or self.nodes[gone].state == NodeState.OFFLINE:
                if self.on_node_gone is not None:
                    self.on_node_gone(gone)
        self.counters["ring_changes"] += 1
        logger.info("node %r: ring is now %s", self.node_id, sorted(members, key=node_order))

    # ------------------------------------------------------------------ presence in the store
    def announce(self, wait_for: int | None = None) -> None:
        """Start this process's heartbeat, publish its record, and wait (at most ``startup_timeout_s``) until
        ``wait_for`` ranks (default: every rank of the launch) have announced themselves; then read theirs."""
        self.announced = True
        self.transport.start_heartbeat()
        self.publish_node()
        self.transport.add(self.transport.key("joined"), 1)
        wait_for = self.transport.world_size if wait_for is None else wait_for
        deadline = time.monotonic() + self.config.startup_timeout_s
        while self.transport.add(self.transport.key("joined"), 0) < wait_for:
            if time.monotonic() > deadline:
                logger.warning("rank %d: fewer than %d ranks announced themselves within %.0f s", self.node_id,
                               wait_for, self.config.startup_timeout_s)
                break
            time.sleep(0.01)
        self.discover_nodes()

    def publish_node(self) -> None:
        """Post this process's record (its state) once it has announced itself; nothing before."""
        if self.transport is not None and self.announced:
            self.transport.post(self.transport.key("node", self.node_id), self.node.to_json())

    def discover_nodes(self) -> None:
        """Read the announcements of ranks not seen yet (late joiners) or gone (they may have rejoined)."""
        if self.transport is None:
            return
        for peer in range(self.transport.world_size):
            if peer != self.node_id and (peer not in self.nodes or self.nodes[peer].state == NodeState.OFFLINE):
                data = self.transport.read_or_none(self.transport.key("node", peer), peer)
                if data is not None:
                    self.nodes[peer] = self._node_record(peer, data)
