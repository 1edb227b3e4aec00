"""``CacheCoordinator``: the processes of a launch act as one prefix cache.

It owns the cluster view (``NodeInfo`` per process, the ring of processes
that own keys, the directory of which process holds which chunk) and runs
*rounds*. Every process calls ``generate(prompts)`` once per batch (the usual
data-parallel loop); a round is:

1. post a *view* (this process's prompts with their chunk keys, its state,
   its directory version, migration and eviction announcements) and read every
   peer's view;
2. compute the routing plan (``routing.plan_routes``), identical everywhere;
3. serve the prompts routed here, from any process, with the local prefix
   store; post each origin its results (an empty message where nothing was
   served, so nobody waits for what will not come);
4. read the results of prompts served elsewhere; whatever did not come (dead
   peer, open breaker, diverging plan) is served locally: no prompt is lost;
5. one migration step (``entry_exchange``): send chunks whose owners lack
   them, at most ``migration_mb_per_step``; a draining process drops what
   every owner now holds.

Reads are bounded (see ``transport``): a dead peer is noticed within the
heartbeat timeout and its breaker opens after repeated failures; while open,
the peer is left out of rounds and of the ring, and its prompts never depend on
it. Ranks that fall behind (stalled, restarted their loop) jump to the
others' round number, so one stall does not desynchronise the cluster.

Without a transport (one process, no distributed launch) ``generate`` serves
locally and the seed-compatible calls (``register_node``, ``get_placement``,
``register_entry``, ``trigger_global_eviction``) work on the in-process view.

``generate`` is a serving entry point: given a ``RateLimiter`` it takes a
token from the caller's ``client`` bucket first (a refused call still takes
part in the round, without prompts, so the peers are not left waiting), and
given a ``ServingMetrics`` it counts requests by outcome under the
``coordinator`` entry point and prompts recomputed locally as fallbacks.
``peers_alive()`` feeds the health check ``serving.peers_check``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pybreaker
import torch.distributed as dist

from ..config import DistributedConfig
from ..resilience.metrics import ServingMetrics
from ..resilience.rate_limit import RateLimiter, RateLimitExceeded
from .entry_exchange import EntryExchange
from .eviction import eviction_shares
from .hash_ring import ConsistentHashRing
from .local_entries import LocalEntries
from .nodes import EntryDirectory, NodeInfo, NodeState
from .payloads import decode_json, encode_json
from .routing import Route, RouteRequest, plan_routes
from .transport import PeerLeft, PeerUnavailable, StoreTransport

__all__ = ["CacheCoordinator", "EvictionReport", "create_distributed_cache_optimizer"]

logger = logging.getLogger(__name__)

MIB = 2**20
ENTRY_POINT = "coordinator"  # the entry point and component label in ServingMetrics
_KEEP_POSTS_ROUNDS = 2  # own messages are deleted this many rounds later (peers one round behind still read them)

ServeBatch = Callable[[list[list[int]]], list[list[int]]]
PromptKeys = Callable[[Sequence[int]], list[bytes]]


@dataclass
class EvictionReport:
    """What ``trigger_global_eviction`` asked of each process and what this one freed."""

    target_bytes: int
    shares: dict[int, int]
    freed_local_bytes: int
    announced: bool  # whether the other processes were told (distributed launch)


@dataclass
class _RoundState:
    number: int
    views: dict[int, dict[str, Any]] = field(default_factory=dict)
    routes: dict[tuple[int, int], Route] = field(default_factory=dict)


class CacheCoordinator:
    """One process's side of the shared prefix cache; see the module docstring.

    Args:
        local_node: this process (``node_id`` is its rank).
        config: ring, replication, timeout and migration settings.
        local_entries: this process's prefix entries (``PrefixStoreAdapter``); None for
            the bookkeeping-only API.
        transport: messages to the other processes; None for one process.
        serve_batch: generates for a batch of prompts (token lists) with the local
            store; returns the new tokens of each.
        prompt_keys: the chained chunk keys of a prompt, the same in every process.
        metrics: where requests, local recomputes and errors are counted (the transport's breakers take
            their own); None for nowhere.
        limiter: per-client rate limit of ``generate``; None for none.
    """

    def __init__(
        self,
        local_node: NodeInfo,
        config: DistributedConfig | None = None,
        *,
        local_entries: LocalEntries | None = None,
        transport: StoreTransport | None = None,
        serve_batch: ServeBatch | None = None,
        prompt_keys: PromptKeys | None = None,
        metrics: ServingMetrics | None = None,
        limiter: RateLimiter | None = None,
    ):
        self.config = config or DistributedConfig()
        self.metrics = metrics
        self.limiter = limiter
        self.node = local_node
        self.local_entries = local_entries
        self.transport = transport
        self.serve_batch = serve_batch
        self.prompt_keys = prompt_keys
        self.nodes: dict[int, NodeInfo] = {local_node.node_id: local_node}
        self.ring = ConsistentHashRing(self.config.virtual_nodes)
        self.directory = EntryDirectory()
        self.counters: Counter[str] = Counter()
        self.last_routes: dict[tuple[int, int], Route] = {}  # the latest round's plan, (origin, index) -> route
        self._round = 0
        self._posted: dict[int, list[str]] = {}
        self.entries = EntryExchange(
            local_node.node_id, local_entries, self.directory, transport, self.counters,
            int(self.config.migration_mb_per_step * MIB),
        )
        self._started = False
        self._refresh_ring()

    @property
    def node_id(self) -> int:
        return self.node.node_id

    @property
    def replication_factor(self) -> int:
        return self.config.replication_factor

    # ------------------------------------------------------------------ seed-compatible cluster view
    def register_node(self, node: NodeInfo) -> None:
        """Add or update a process in the cluster view (its state decides ring membership)."""
        if not isinstance(node, NodeInfo):
            raise ValueError(f"`node` has to be a NodeInfo but got {type(node).__name__}")
        self.nodes[node.node_id] = node
        if node.state == NodeState.OFFLINE:
            self.directory.drop_node(node.node_id)
        self._refresh_ring()

    def get_placement(self, key: bytes | str) -> list[int]:
        """The processes that own ``key`` (a chain's first chunk key), primary first."""
        return self.ring.get_nodes(key, self.replication_factor)

    def register_entry(self, key: bytes, size_bytes: int, node_ids: Sequence[int]) -> None:
        """Record that ``node_ids`` hold ``key`` of ``size_bytes`` bytes."""
        unknown = [n for n in node_ids if n not in self.nodes]
        if unknown:
            raise ValueError(f"`node_ids` names unregistered nodes {unknown}; registered are {sorted(self.nodes)}")
        self.directory.add(key, size_bytes, node_ids)

    def trigger_global_eviction(self, target_reduction_mb: float) -> EvictionReport:
        """Ask every process to free its share of ``target_reduction_mb`` MiB (in proportion to what it holds):
        replicas before sole copies, coldest first. This process frees its share now; the others on their next
        round."""
        if not isinstance(target_reduction_mb, (int, float)) or isinstance(target_reduction_mb, bool) or (
            target_reduction_mb < 0
        ):
            raise ValueError(f"`target_reduction_mb` has to be a number >= 0 but got {target_reduction_mb!r}")
        self._publish_local_entries()
        target = int(target_reduction_mb * MIB)
        held = {n: self.directory.bytes_of(n) for n, info in self.nodes.items() if info.state != NodeState.OFFLINE}
        shares = eviction_shares(target, held)
        announced = False
        if self.transport is not None and self._started:
            self.entries.post_eviction(shares)
            announced = True
        freed = self._evict_local_share(shares.get(self.node_id, 0))
        self.counters["global_evictions_triggered"] += 1
        logger.info("global eviction of %d bytes: shares %s, freed here %d", target, shares, freed)
        return EvictionReport(target, shares, freed, announced)

    # ------------------------------------------------------------------ lifecycle
    def start(self, wait_for: int | None = None) -> "CacheCoordinator":
        """Announce this process and wait (at most ``startup_timeout_s``) until ``wait_for`` ranks (default: every
        rank of the launch) have announced themselves. A rank that starts later joins at its first round."""
        if self._started:
            return self
        self._started = True
        if self.transport is None:
            return self
        self.transport.start_heartbeat()
        self._publish_node()
        self.transport.add(self._key("joined"), 1)
        wait_for = self.transport.world_size if wait_for is None else wait_for
        deadline = time.monotonic() + self.config.startup_timeout_s
        while self.transport.add(self._key("joined"), 0) < wait_for:
            if time.monotonic() > deadline:
                logger.warning("rank %d: fewer than %d ranks announced themselves within %.0f s", self.node_id,
                               wait_for, self.config.startup_timeout_s)
                break
            time.sleep(0.01)
        self._discover_nodes()
        return self

    def drain(self, timeout_s: float = 60.0) -> int:
        """Hand every local entry to its owners (rounds without prompts), then leave. Returns the entries left
        behind (0: everything handed over)."""
        self.start()
        self.node.state = NodeState.DRAINING
        self._publish_node()
        self._refresh_ring()
        deadline = time.monotonic() + timeout_s
        left = self.entries.entry_count()
        while self.transport is not None and left and time.monotonic() < deadline:
            if not any(info.state == NodeState.ACTIVE for n, info in self.nodes.items() if n != self.node_id):
                break  # nobody to hand over to
            self.step()
            left = self.entries.entry_count()
        logger.info("rank %d drained: %d entries left behind", self.node_id, left)
        self.close()
        return left

    def join(self) -> None:
        """Become ACTIVE again after ``drain`` or ``close``: back on the ring, peers hear from it again."""
        self.node.state = NodeState.ACTIVE
        if self.transport is not None and self._started:
            self.transport.start_heartbeat()
        self._publish_node()
        self._refresh_ring()

    def close(self) -> None:
        """Leave: peers stop waiting for this process at once (no breaker failures)."""
        if self.node.state != NodeState.OFFLINE:
            self.node.state = NodeState.OFFLINE
            self._publish_node()
        if self.transport is not None:
            self.transport.stop_heartbeat()
            # the last rounds' messages stay: a peer may still be reading them
            for round_no in [r for r in self._posted if r <= self._round - _KEEP_POSTS_ROUNDS]:
                self._forget_posts(round_no)

    def __enter__(self) -> "CacheCoordinator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ rounds
    def step(self) -> None:
        """A round without prompts: keeps migrations, directories and evictions moving (never rate-limited)."""
        self._generate([])

    def generate(self, prompts: Sequence[Sequence[int]], *, client: str = "default") -> list[list[int]]:
        """New tokens for each prompt, in order, served wherever its prefix is; see the module docstring.

        Raises ``RateLimitExceeded`` when ``client`` is over its rate limit (after taking part in the round).
        """
        if self.limiter is not None:
            try:
                self.limiter.acquire(client)
            except RateLimitExceeded:
                self._count("rate_limited")
                if self.transport is not None and self.node.state != NodeState.OFFLINE:
                    self._generate([])  # the peers expect this process's view in this round
                raise
        try:
            prompts = [[int(t) for t in p] for p in prompts]
        except (TypeError, ValueError) as exc:
            self._count("invalid")
            raise ValueError(f"`prompts` has to be a list of token id lists: {exc}") from exc
        try:
            outputs, recomputed = self._generate(prompts)
        except Exception as exc:  # noqa: BLE001 - counted, then re-raised as it was
            if self.metrics is not None:
                self.metrics.record_error(ENTRY_POINT, exc)
            self._count("failed")
            raise
        self._count("degraded" if recomputed else "served")
        return outputs

    def _generate(self, prompts: list[list[int]]) -> tuple[list[list[int]], int]:
        """The outputs, and how many prompts were recomputed here because their server did not answer."""
        if self.transport is None or self.node.state == NodeState.OFFLINE:
            self.counters["served_local"] += len(prompts)
            outputs = self._serve(prompts)
            self._publish_local_entries()
            return outputs, 0
        self.start()
        reason = "peer_unavailable"
        try:
            outputs = self._run_round(prompts)
        except (dist.DistError, pybreaker.CircuitBreakerError) as exc:
            # the store itself failed (its breaker is open, or it went away): this round is served here
            logger.warning("rank %d: round %d served locally, the store failed: %s", self.node_id, self._round, exc)
            self.counters["rounds_without_store"] += 1
            if self.metrics is not None:
                self.metrics.record_error(ENTRY_POINT, exc)
            outputs, reason = {}, "store_unavailable"
        missing = [i for i in range(len(prompts)) if i not in outputs]
        if missing:
            self.counters["served_local_fallback"] += len(missing)
            if self.metrics is not None:
                self.metrics.record_fallback(ENTRY_POINT, "generate", reason, len(missing))
            outputs.update(zip(missing, self._serve([prompts[i] for i in missing])))
        return [outputs[i] for i in range(len(prompts))], len(missing)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(ENTRY_POINT, outcome).inc()

    # ------------------------------------------------------------------ health
    def peers_alive(self) -> dict[str, bool]:
        """``{"rank<n>": reachable}`` for every known peer that has not left: False while its breaker is open
        (its prompts are served here). Empty without a transport. For ``serving.peers_check``."""
        if self.transport is None:
            return {}
        return {
            f"rank{p}": self.transport.breaker_state(p) != pybreaker.STATE_OPEN
            for p in self._peers()
            if self.nodes[p].state != NodeState.OFFLINE
        }

    @property
    def breakers(self) -> list[pybreaker.CircuitBreaker]:
        """The transport's breakers (one per peer, one for the store); empty without a transport."""
        if self.transport is None:
            return []
        return [*self.transport.breakers.values(), self.transport.c10d_store_breaker]

    def _run_round(self, prompts: list[list[int]]) -> dict[int, list[int]]:
        """One round (see the module docstring); returns the outputs that came, by prompt index."""
        state = _RoundState(self._begin_round())
        keys = [self._keys_of(p) for p in prompts]
        self._publish_local_entries()
        state.views[self.node_id] = view = self._view(prompts, keys)
        self._post_round(state.number, self._key("round", state.number, "view", self.node_id), encode_json(view))
        self._read_views(state)
        self._absorb_views(state)
        requests = [
            RouteRequest(origin, i, tuple(bytes.fromhex(k) for k in prompt_keys))
            for origin, v in state.views.items()
            for i, prompt_keys in enumerate(v["keys"])
        ]
        servers = [n for n in state.views if state.views[n]["node"]["state"] == NodeState.ACTIVE.value]
        state.routes = plan_routes(
            requests, self.ring, self.directory, servers, self.replication_factor, self.config.load_slack
        )
        self.last_routes = state.routes
        outputs = self._serve_round(state)
        outputs.update(self._collect_results(state, len(prompts)))
        self._publish_local_entries()
        self.entries.migration_step(
            state.number, self.ring, self.replication_factor, self.node.state == NodeState.ACTIVE, self._reachable
        )
        self._forget_posts(state.number - _KEEP_POSTS_ROUNDS)
        return outputs

    def _begin_round(self) -> int:
        peers = [p for p in self._peers() if self.nodes[p].state != NodeState.OFFLINE]
        theirs = [self._peer_round(p) for p in peers if self.transport.may_call(p)]
        number = max([self._round + 1, *theirs])
        if number > self._round + 1:
            self.counters["rounds_skipped"] += number - self._round - 1
        self.transport.add(self._key("round_no", self.node_id), number - self._round)
        self._round = number
        self.counters["rounds"] += 1
        return number

    def _view(self, prompts: list[list[int]], keys: list[list[bytes]]) -> dict[str, Any]:
        return {
            "node": decode_json(self.node.to_json()),
            "prompts": prompts,
            "keys": [[k.hex() for k in ks] for ks in keys],
            **self.entries.announcements(),
        }

    def _read_views(self, state: _RoundState) -> None:
        for peer in self._peers_to_hear():
            key = self._key("round", state.number, "view", peer)
            message = self._receive(peer, key, state.number, delete=False)
            if message is not None:
                state.views[peer] = decode_json(message)

    def _absorb_views(self, state: _RoundState) -> None:
        for peer, view in state.views.items():
            if peer == self.node_id:
                continue
            node = NodeInfo(**view["node"])
            known = self.nodes.get(peer)
            self.nodes[peer] = node
            if known is None or known.state != node.state:
                logger.info("rank %d sees rank %d as %s", self.node_id, peer, node.state.value)
            self.entries.absorb(peer, view, self._evict_local_share)
        self._discover_nodes()
        self._refresh_ring()

    def _serve_round(self, state: _RoundState) -> dict[int, list[int]]:
        """Serve what the plan gives this process; post each origin its part. Returns this process's own."""
        mine = sorted(key for key, route in state.routes.items() if route.server == self.node_id)
        batch = [state.views[origin]["prompts"][i] for origin, i in mine]
        served = dict(zip(mine, self._serve(batch))) if batch else {}
        for origin, i in mine:
            self.counters["served_for_others" if origin != self.node_id else "served_here"] += 1
            self.counters["planned_hit_chunks"] += state.routes[(origin, i)].hit_chunks
        for peer in self._peers():
            if self.nodes[peer].state == NodeState.OFFLINE:
                continue
            results = {str(i): out for (origin, i), out in served.items() if origin == peer}
            key = self._key("round", state.number, "result", self.node_id, peer)
            self._post_round(state.number, key, encode_json(results))
        return {i: out for (origin, i), out in served.items() if origin == self.node_id}

    def _collect_results(self, state: _RoundState, count: int) -> dict[int, list[int]]:
        outputs: dict[int, list[int]] = {}
        servers = sorted(
            {r.server for (origin, _), r in state.routes.items() if origin == self.node_id and r.server != self.node_id}
        )
        for server in servers:
            self.counters["sent_to_others"] += sum(
                1 for (o, _), r in state.routes.items() if o == self.node_id and r.server == server
            )
            message = self._receive(server, self._key("round", state.number, "result", server, self.node_id), state.number)
            if message is not None:
                outputs.update({int(i): out for i, out in decode_json(message).items() if 0 <= int(i) < count})
        return outputs

    # ------------------------------------------------------------------ entries
    def _publish_local_entries(self) -> None:
        self.entries.publish(remote=self.transport is not None and self._started)

    def _evict_local_share(self, share_bytes: int) -> int:
        freed = self.entries.evict_share(share_bytes, self.ring, self.replication_factor, self._reachable)
        self._publish_local_entries()
        return freed

    # ------------------------------------------------------------------ membership
    def _peers(self) -> list[int]:
        if self.transport is None:
            return []
        return [p for p in range(self.transport.world_size) if p != self.node_id and p in self.nodes]

    def _peers_to_hear(self) -> list[int]:
        return [p for p in self._peers() if self.nodes[p].state != NodeState.OFFLINE and self.transport.may_call(p)]

    def _reachable(self, node_id: int) -> bool:
        if node_id == self.node_id:
            return True
        if self.transport is None:
            return self.nodes.get(node_id, NodeInfo(node_id, state=NodeState.OFFLINE)).state != NodeState.OFFLINE
        return node_id in self.nodes and self.transport.breaker_state(node_id) != pybreaker.STATE_OPEN

    def _refresh_ring(self) -> None:
        """Ring = ACTIVE processes not cut off by an open breaker, weighted by capacity."""
        largest = max(info.capacity_mb for info in self.nodes.values())
        members = {
            n: info.capacity_mb / largest
            for n, info in self.nodes.items()
            if info.state == NodeState.ACTIVE and self._reachable(n)
        }
        if members == self.ring.weights:
            return
        before = set(self.ring.nodes)
        ring = ConsistentHashRing(self.config.virtual_nodes)
        for n, weight in sorted(members.items()):
            ring.add_node(n, weight)
        self.ring = ring
        for gone in before - set(members):
            if not self._reachable(gone) or self.nodes[gone].state == NodeState.OFFLINE:
                self.entries.forget(gone)
        self.counters["ring_changes"] += 1
        logger.info("rank %d: ring is now %s", self.node_id, sorted(members))

    def _discover_nodes(self) -> None:
        """Read the announcements of ranks not seen yet (late joiners) or gone (they may have rejoined)."""
        if self.transport is None:
            return
        for peer in range(self.transport.world_size):
            if peer != self.node_id and (peer not in self.nodes or self.nodes[peer].state == NodeState.OFFLINE):
                data = self.transport.read_or_none(self._key("node", peer))
                if data is not None:
                    self.nodes[peer] = NodeInfo.from_json(data)

    def _publish_node(self) -> None:
        if self.transport is not None and self._started:
            self.transport.post(self._key("node", self.node_id), self.node.to_json())

    def _peer_round(self, peer: int) -> int:
        return self.transport.add(self._key("round_no", peer), 0)

    def _peer_left(self, peer: int) -> bool:
        data = self.transport.read_or_none(self._key("node", peer))
        return data is not None and NodeInfo.from_json(data).state == NodeState.OFFLINE

    # ------------------------------------------------------------------ guarded calls
    def _key(self, *parts: object) -> str:
        return self.transport.key(*parts)

    def _receive(self, peer: int, key: str, round_no: int, delete: bool = True) -> bytes | None:
        """A peer's message, or None when it did not come (the reason is logged and counted)."""
        try:
            return self.transport.receive(
                peer,
                key,
                self.config.round_timeout_s,
                round_no=round_no,
                peer_round=self._peer_round,
                peer_left=self._peer_left,
                delete=delete,
            )
        except (PeerUnavailable, pybreaker.CircuitBreakerError, dist.DistError) as exc:
            # a DistError is the store failing under a wait: it counts against the peer waited for
            self.counters[f"missed_{type(exc).__name__}"] += 1
            logger.info("rank %d, round %d: %s", self.node_id, round_no, exc)
            if isinstance(exc, PeerLeft):
                self.nodes[peer].state = NodeState.OFFLINE
            if isinstance(exc, PeerLeft) or self.transport.breaker_state(peer) == pybreaker.STATE_OPEN:
                self._refresh_ring()
            return None

    def _post_round(self, round_no: int, key: str, payload: bytes) -> None:
        self.transport.post(key, payload)
        self._posted.setdefault(round_no, []).append(key)

    def _forget_posts(self, round_no: int) -> None:
        for key in self._posted.pop(round_no, []):
            try:
                self.transport.delete([key])
            except (dist.DistError, pybreaker.CircuitBreakerError) as exc:
                logger.info("rank %d: could not delete %s: %s", self.node_id, key, exc)

    def _keys_of(self, prompt: list[int]) -> list[bytes]:
        return [] if self.prompt_keys is None else list(self.prompt_keys(prompt))

    def _serve(self, prompts: list[list[int]]) -> list[list[int]]:
        if not prompts:
            return []
        if self.serve_batch is None:
            raise ValueError("this coordinator has no `serve_batch`; pass one to serve prompts")
        outputs = self.serve_batch(prompts)
        if len(outputs) != len(prompts):
            raise ValueError(f"`serve_batch` returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [[int(t) for t in out] for out in outputs]

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """Counters, breaker states and transitions, ring and directory sizes."""
        out: dict[str, Any] = {
            **self.counters,
            "node_id": self.node_id,
            "state": self.node.state.value,
            "round": self._round,
            "ring": self.ring.nodes,
            "directory_keys": len(self.directory),
        }
        if self.transport is not None:
            out["breakers"] = {p: self.transport.breaker_state(p) for p in self.transport.breakers}
            out["breaker_transitions"] = {f"{name}:{state}": n for (name, state), n in self.transport.events.transitions.items()}
            out["transport"] = dict(self.transport.counters)
        return out


def create_distributed_cache_optimizer(
    local_node_id: int = 0,
    replication_factor: int = DistributedConfig.replication_factor,
    *,
    capacity_mb: float = NodeInfo.capacity_mb,
    address: str = "",
    config: DistributedConfig | None = None,
    **kwargs: Any,
) -> CacheCoordinator:
    """Seed-compatible constructor: a ``CacheCoordinator`` for ``local_node_id`` (no transport unless given)."""
    base = config or DistributedConfig()
    if replication_factor != base.replication_factor:
        base = dataclasses.replace(base, replication_factor=replication_factor)
    return CacheCoordinator(NodeInfo(local_node_id, address, capacity_mb), base, **kwargs)
