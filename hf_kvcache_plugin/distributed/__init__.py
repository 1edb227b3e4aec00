"""One prefix cache across the processes of an ``accelerate`` / ``torchrun`` launch.

The file tree follows the data flow: ``hash_ring`` (who owns a key) ->
``nodes`` (the cluster view) -> ``routing`` (who serves a prompt) ->
``transport`` (bounded messages between processes, ``payloads`` on the wire)
-> ``coordinator`` (rounds) and ``entry_exchange`` (directories, migration
batches, eviction orders) over ``local_entries`` (this process's prefix entries;
``prefix_adapter`` for ``PrefixStore``). ``migration`` and ``eviction`` are the
pure planning parts; ``serving`` wires a hooked model in.
"""

from .coordinator import CacheCoordinator, EvictionReport, create_distributed_cache_optimizer
from .eviction import eviction_shares, plan_local_eviction
from .hash_ring import ConsistentHashRing, ring_position
from .local_entries import EntryInfo, LocalEntries
from .migration import MigrationPlan, Transfer, plan_migration, split_into_steps
from .nodes import EntryDirectory, NodeInfo, NodeState
from .prefix_adapter import PrefixStoreAdapter
from .routing import Route, RouteRequest, plan_routes
from .launch import attach_coordinator, generate_new_tokens, launch_rank
from .transport import StoreTransport, connect_c10d_store

__all__ = [
    "CacheCoordinator",
    "ConsistentHashRing",
    "EntryDirectory",
    "EntryInfo",
    "EvictionReport",
    "LocalEntries",
    "MigrationPlan",
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
