"""One prefix cache across the processes of an ``accelerate`` / ``torchrun`` launch.

The file tree follows the data flow, each module importing only those before
it: ``hash_ring`` (who owns a key) -> ``nodes`` (processes and the directory of
who holds which chunk) -> ``routing`` (who serves a prompt) -> ``transport``
(bounded messages over the launch's c10d store, ``payloads`` on the wire) ->
``cluster_view`` (the processes as this one sees them, the ring, liveness) ->
``round_messages`` (round numbers, per-round messages) and ``entry_exchange``
(directories, migration batches, eviction orders) over ``local_entries`` (this
process's prefix entries; ``prefix_adapter`` for ``PrefixStore``) ->
``round_runner`` (one round: views, plan, serving, results) ->
``coordinator`` (``CacheCoordinator``: ``generate``, lifecycle, stats, the
seed-compatible API) -> ``launch`` (wires a hooked model in). ``migration`` and
``eviction`` are the pure planning parts.
"""

from .coordinator import CacheCoordinator, EvictionReport, create_distributed_cache_optimizer
from .eviction import eviction_shares, plan_local_eviction
from .hash_ring import ConsistentHash, ConsistentHashRing, NodeId, ring_position
from .local_entries import EntryInfo, LocalEntries
from .migration import MigrationPlan, Transfer, plan_migration, split_into_steps
from .nodes import EntryDirectory, NodeInfo, NodeState
from .prefix_adapter import PrefixStoreAdapter
from .routing import Route, RouteRequest, plan_routes
from .launch import attach_coordinator, generate_new_tokens, launch_rank
from .transport import StoreTransport, connect_c10d_store

__all__ = [
    "CacheCoordinator",
    "ConsistentHash",
    "ConsistentHashRing",
    "EntryDirectory",
    "EntryInfo",
    "EvictionReport",
    "LocalEntries",
    "MigrationPlan",
    "NodeId",
    "NodeInfo",
    "NodeState",
    "PrefixStoreAdapter",
    "Route",
    "RouteRequest",
    "StoreTransport",
    "Transfer",
    "attach_coordinator",
    "connect_c10d_store",
    "create_distributed_cache_optimizer",
    "eviction_shares",
    "generate_new_tokens",
    "launch_rank",
    "plan_local_eviction",
    "plan_migration",
    "plan_routes",
    "ring_position",
    "split_into_steps",
]
