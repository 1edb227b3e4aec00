"""Which process serves each sequence of a round: a pure function of what every process knows.

Every process computes the same plan from the same inputs (the round's
requests from all processes, the ring, the directory of stored keys), so the
plan needs no extra agreement step. When views differ (a peer's message was
missed), plans may differ too; the exchange that follows is driven by each
origin's own plan, so that costs a recomputation, never a lost request.

Per request, in order of preference:

1. ``prefix``: a live holder of the request's longest stored prefix (chunk keys
   are chained, so a holder of chunk j holds chunks 0..j too); among several
   holders (replicas) the less loaded.
2. ``placement``: one of the ``replication_factor`` ring owners of the prompt's
   first chunk, the less loaded. Every chunk of a prompt is placed by its first
   chunk, so prompts sharing a beginning meet on the same processes even before
   anything is stored.
3. ``balanced``: the least loaded process (prompts shorter than one chunk have
   nothing to reuse; also where the owners are full).

Loads are bounded (consistent hashing with bounded loads): no process takes
more than ``ceil((1 + load_slack) * requests / processes)`` sequences, so a hot
prefix spills onto other processes instead of queueing on one. Ties go to the
origin (no transfer), then the lower rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..config import DistributedConfig
from .hash_ring import ConsistentHashRing
from .nodes import EntryDirectory

__all__ = ["Route", "RouteRequest", "plan_routes", "longest_stored_prefix"]


@dataclass(frozen=True)
class RouteRequest:
    """One sequence of a round: who received it, its position there, its prompt's chained chunk keys."""

    origin: int
    index: int
    chunk_keys: tuple[bytes, ...]


@dataclass(frozen=True)
class Route:
    server: int
    reason: str  # "prefix" | "placement" | "balanced" | "local"
    hit_chunks: int  # chunks of the prompt the server is known to hold


def longest_stored_prefix(chunk_keys: Sequence[bytes], directory: EntryDirectory, node_id: int) -> int:
    """How many leading chunks of the prompt ``node_id`` holds, per the directory."""
    for depth in range(len(chunk_keys), 0, -1):
        if node_id in directory.holders(chunk_keys[depth - 1]):
            return depth
    return 0


def plan_routes(
    requests: Iterable[RouteRequest],
    ring: ConsistentHashRing,
    directory: EntryDirectory,
    available: Iterable[int],
    replication_factor: int = 1,
    load_slack: float = DistributedConfig.load_slack,
) -> dict[tuple[int, int], Route]:
    """Route every request to an available process; keyed by ``(origin, index)``.

    ``available``: processes that may serve (active and reachable). Requests
    whose origin sees no available process are served by the origin.
    """
    if replication_factor < 1:
        raise ValueError(f"`replication_factor` has to be >= 1 but got {replication_factor}")
    if load_slack < 0:
        raise ValueError(f"`load_slack` has to be >= 0 but got {load_slack}")
    servers = sorted(set(available))
    server_set = set(servers)
    requests = sorted(requests, key=lambda r: (not r.chunk_keys, r.origin, r.index))
    plan: dict[tuple[int, int], Route] = {}
    if not servers:
        return {(r.origin, r.index): Route(r.origin, "local", 0) for r in requests}
    cap = math.ceil((1 + load_slack) * len(requests) / len(servers))
    load = dict.fromkeys(servers, 0)

    def pick(candidates: Sequence[int], origin: int) -> int | None:
        open_ = [n for n in candidates if load[n] < cap]
        if not open_:
            return None
        return min(open_, key=lambda n: (load[n], n != origin, n))

    for request in requests:
        route = None
        if request.chunk_keys:
            route = _prefix_route(request, directory, server_set, pick)
            if route is None:
                owners = [n for n in ring.walk(request.chunk_keys[0]) if n in load][:replication_factor]
                server = pick(owners, request.origin)
                if server is not None:
                    route = Route(server, "placement", longest_stored_prefix(request.chunk_keys, directory, server))
        if route is None:
            server = pick(servers, request.origin)
            # every server at the cap cannot happen (cap * servers >= requests); kept total for safety
            server = request.origin if server is None else server
            hits = longest_stored_prefix(request.chunk_keys, directory, server) if request.chunk_keys else 0
            route = Route(server, "balanced", hits)
        if route.server in load:
            load[route.server] += 1
        plan[(request.origin, request.index)] = route
    return plan


def _prefix_route(request: RouteRequest, directory: EntryDirectory, servers: set[int], pick) -> Route | None:
    """A less loaded live holder of the longest stored prefix, falling back to shorter prefixes."""
    for depth in range(len(request.chunk_keys), 0, -1):
        holders = [n for n in directory.holders(request.chunk_keys[depth - 1]) if n in servers]
        if holders:
            server = pick(holders, request.origin)
            if server is not None:
                return Route(server, "prefix", depth)
            # every holder of this depth is full: a shorter prefix may have other holders
    return None
