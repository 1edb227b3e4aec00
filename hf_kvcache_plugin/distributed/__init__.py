"""One prefix cache across the processes of an ``accelerate`` / ``torchrun`` launch.

The file tree follows the data flow: ``hash_ring`` (who owns a key) ->
``nodes`` (the cluster view) -> ``routing`` (who serves a prompt), over a
``local_store`` (one process's prefix store). ``migration`` and ``eviction``
are the pure planning parts.
"""

from .eviction import eviction_shares, plan_local_eviction
from .hash_ring import ConsistentHashRing, ring_position
from .local_store import EntryInfo, EntryStore
from .migration import MigrationPlan, Transfer, plan_migration, split_into_steps
from .nodes import EntryDirectory, NodeInfo, NodeState
from .routing import Route, RouteRequest, plan_routes

__all__ = [
    "ConsistentHashRing",
    "EntryDirectory",
    "EntryInfo",
    "EntryStore",
    "MigrationPlan",
    "NodeInfo",
    "NodeState",
    "Route",
    "RouteRequest",
    "Transfer",
    "eviction_shares",
    "plan_local_eviction",
    "plan_migration",
    "plan_routes",
    "ring_position",
    "split_into_steps",
]
