"""``CacheCoordinator``: the processes of a launch act as one prefix cache.

Every process calls ``generate(prompts)`` once per batch (the usual
data-parallel loop); each call is a *round* in which the prompts of every
process are routed to the process holding their prefix, served there, and
their outputs sent back (``round_runner``). Whatever did not come back (dead
peer, open breaker, diverging plan, a failing store) is served here: no prompt
is lost.

The coordinator puts its parts together and owns what callers see:

- ``cluster_view``: the processes, the ring of key owners, this process's
  presence in the store, peer liveness (``peers_alive``);
- ``round_messages``: round numbers and the per-round messages;
- ``round_runner``: one round, views to results;
- ``entry_exchange``: directories, migration batches, eviction orders;
- here: ``generate`` (rate limit, metrics, local fallbacks), the lifecycle
  (``start``, ``drain``, ``join``, ``close``), ``stats``, and the
  seed-compatible calls (``register_node``, ``get_placement``,
  ``register_entry``, ``trigger_global_eviction``).

Reads are bounded (``transport``): a dead peer costs at most the heartbeat
timeout, and while its breaker is open it is left out of rounds and off the
ring. Without a transport (one process, no distributed launch) ``generate``
serves locally and the seed-compatible calls work on the in-process view.

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
from dataclasses import dataclass
from typing import Any

import pybreaker
import torch.distributed as dist

from ..config import DistributedConfig
from ..resilience.metrics import ServingMetrics
from ..resilience.rate_limit import RateLimiter, RateLimitExceeded
from .cluster_view import ClusterView
from .entry_exchange import EntryExchange
from .eviction import eviction_shares
from .hash_ring import ConsistentHashRing, NodeId, node_order
from .local_entries import LocalEntries
from .migration_pacing import MigrationPacer
from .nodes import EntryDirectory, NodeInfo, NodeState
from .round_messages import RoundMessages
from .round_runner import RoundRunner
from .routing import Route
from .transport import StoreTransport

__all__ = ["CacheCoordinator", "EvictionReport", "create_distributed_cache_optimizer"]

logger = logging.getLogger(__name__)

MIB = 2**20
ENTRY_POINT = "coordinator"  # the entry point and component label in ServingMetrics

ServeBatch = Callable[..., list[list[int]]]  # (prompts[, max_new_tokens]) -> the new tokens of each
PromptKeys = Callable[[Sequence[int]], list[bytes]]


@dataclass
class EvictionReport:
    """What ``trigger_global_eviction`` asked of each process and what this one freed."""

    target_bytes: int
    shares: dict[NodeId, int]
    freed_local_bytes: int
    announced: bool  # whether the other processes were told (distributed launch)


class CacheCoordinator:
    """One process's side of the shared prefix cache; see the module docstring.

    Args:
        local_node: this process. Its ``node_id`` is its rank when there is a transport; without one (the
            bookkeeping-only API) any id, a name such as ``"node-0"`` included.
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
        vocab_size: token ids of prompts (this process's and its peers') and of peers' results are below it;
            None: not checked.
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
        vocab_size: int | None = None,
    ):
        if transport is not None and local_node.node_id != transport.rank:
            raise ValueError(
                f"with a transport, `local_node.node_id` has to be this process's rank {transport.rank} but got "
                f"{local_node.node_id!r}"
            )
        self.config = config or DistributedConfig()
        self.metrics = metrics
        self.limiter = limiter
        self.local_entries = local_entries
        self.transport = transport
        self.serve_batch = serve_batch
        self.prompt_keys = prompt_keys
        self.directory = EntryDirectory()
        self.counters: Counter[str] = Counter()  # shared by the parts: stats() shows them all
        self.cluster = ClusterView(local_node, self.config, transport, self.counters)
        self.messages = RoundMessages(self.cluster, transport, self.config, self.counters)
        self.migration_pacer = MigrationPacer(
            self.config.migration_time_budget_ms / 1000, int(self.config.migration_mb_per_step * MIB),
            self.config.migration_initial_mb_per_s, metrics=metrics, rank=local_node.node_id,
        )
        self.entry_exchange = EntryExchange(
            self.cluster, local_entries, self.directory, transport, self.counters, self.migration_pacer, self.messages,
        )
        # a process that leaves the ring for good takes what it held with it
        self.cluster.on_node_gone = self.entry_exchange.forget
        # the coordinator's own methods, so that a `serve_batch` or `prompt_keys` set later is the one used
        self.rounds = RoundRunner(
            self.cluster, self.messages, self.entry_exchange, self.directory, self.config, self.counters,
            serve=self._serve, keys_of=self._keys_of, vocab_size=vocab_size,
        )
        self.vocab_size = vocab_size

    # ------------------------------------------------------------------ the parts' state, for callers
    @property
    def node(self) -> NodeInfo:
        return self.cluster.node

    @property
    def node_id(self) -> NodeId:
        return self.cluster.node_id

    @property
    def nodes(self) -> dict[NodeId, NodeInfo]:
        return self.cluster.nodes

    @property
    def ring(self) -> ConsistentHashRing:
        return self.cluster.ring

    @property
    def replication_factor(self) -> int:
        return self.config.replication_factor

    @property
    def last_routes(self) -> dict[tuple[int, int], Route]:
        """The latest round's plan, (origin, index) -> route."""
        return self.rounds.last_routes

    # ------------------------------------------------------------------ seed-compatible cluster view
    def register_node(self, node: NodeInfo) -> None:
        """Add or update a process in the cluster view (its state decides ring membership)."""
        if not isinstance(node, NodeInfo):
            raise ValueError(f"`node` has to be a NodeInfo but got {type(node).__name__}")
        self.nodes[node.node_id] = node
        if node.state == NodeState.OFFLINE:
            self.directory.drop_node(node.node_id)
        self.cluster.refresh_ring()

    def get_placement(self, key: bytes | str) -> list[NodeId]:
        """The processes that own ``key`` (a chain's first chunk key), primary first."""
        return self.cluster.placement(key)

    def register_entry(self, key: bytes | str, size_bytes: int, node_ids: Sequence[NodeId]) -> None:
        """Record that ``node_ids`` hold ``key`` of ``size_bytes`` bytes."""
        unknown = [n for n in node_ids if n not in self.nodes]
        if unknown:
            raise ValueError(
                f"`node_ids` names unregistered nodes {unknown}; registered are {sorted(self.nodes, key=node_order)}"
            )
        self.directory.add(key, size_bytes, node_ids)

    def trigger_global_eviction(self, target_reduction_mb: float) -> EvictionReport:
        """Ask every process to free its share of ``target_reduction_mb`` MiB (in proportion to what it holds):
        replicas before sole copies, coldest first. This process frees its share now; the others on their next
        round."""
        if not isinstance(target_reduction_mb, (int, float)) or isinstance(target_reduction_mb, bool) or (
            target_reduction_mb < 0
        ):
            raise ValueError(f"`target_reduction_mb` has to be a number >= 0 but got {target_reduction_mb!r}")
        self.entry_exchange.publish()
        target = int(target_reduction_mb * MIB)
        held = {n: self.directory.bytes_of(n) for n, info in self.nodes.items() if info.state != NodeState.OFFLINE}
        shares = eviction_shares(target, held)
        announced = False
        if self.cluster.announced:  # the others can be told only through the store
            self.entry_exchange.post_eviction(shares)
            announced = True
        freed = self.entry_exchange.evict_share(shares.get(self.node_id, 0))
        self.counters["global_evictions_triggered"] += 1
        logger.info("global eviction of %d bytes: shares %s, freed here %d", target, shares, freed)
        return EvictionReport(target, shares, freed, announced)

    # ------------------------------------------------------------------ lifecycle
    def start(self, wait_for: int | None = None) -> "CacheCoordinator":
        """Announce this process and wait (at most ``startup_timeout_s``) until ``wait_for`` ranks (default: every
        rank of the launch) have announced themselves. A rank that starts later joins at its first round."""
        if self.transport is not None and not self.cluster.announced:
            self.cluster.announce(wait_for)
        return self

    def drain(self, timeout_s: float = 60.0) -> int:
        """Hand every local entry to its owners (rounds without prompts), then leave. Returns the entries left
        behind (0: everything handed over)."""
        self.start()
        self.node.state = NodeState.DRAINING
        self.cluster.publish_node()
        self.cluster.refresh_ring()
        deadline = time.monotonic() + timeout_s
        left = self.entry_exchange.entry_count()
        while self.transport is not None and left and time.monotonic() < deadline:
            if not any(info.state == NodeState.ACTIVE for n, info in self.nodes.items() if n != self.node_id):
                break  # nobody to hand over to
            self.step()
            left = self.entry_exchange.entry_count()
        logger.info("node %r drained: %d entries left behind", self.node_id, left)
        self.close()
        return left

    def join(self) -> None:
        """Become ACTIVE again after ``drain`` or ``close``: back on the ring, peers hear from it again."""
        self.node.state = NodeState.ACTIVE
        if self.cluster.announced:
            self.transport.start_heartbeat()
        self.cluster.publish_node()
        self.cluster.refresh_ring()

    def close(self) -> None:
        """Leave: peers stop waiting for this process at once (no breaker failures)."""
        if self.node.state != NodeState.OFFLINE:
            self.node.state = NodeState.OFFLINE
            self.cluster.publish_node()
        if self.transport is not None:
            self.transport.stop_heartbeat()
            self.messages.forget_settled()

    def __enter__(self) -> "CacheCoordinator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ serving
    def step(self) -> None:
        """A round without prompts: keeps migrations, directories and evictions moving (never rate-limited)."""
        self._generate([])

    def generate(
        self, prompts: Sequence[Sequence[int]], *, client: str = "default", max_new_tokens: int | None = None
    ) -> list[list[int]]:
        """New tokens for each prompt, in order, served wherever its prefix is; see the module docstring.

        ``max_new_tokens`` (None: ``serve_batch``'s own) goes with the prompts to whichever process serves them.

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
            self._check_prompts(prompts)
        except (TypeError, ValueError) as exc:
            self._count("invalid")
            if self.transport is not None and self.node.state != NodeState.OFFLINE:
                self._generate([])  # the peers expect this process's view in this round
            raise ValueError(f"`prompts` has to be a list of token id lists: {exc}") from exc
        try:
            outputs, recomputed = self._generate(prompts, max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - counted, then re-raised as it was
            if self.metrics is not None:
                self.metrics.record_error(ENTRY_POINT, exc)
            self._count("failed")
            raise
        self._count("degraded" if recomputed else "served")
        return outputs

    def _generate(self, prompts: list[list[int]], max_new_tokens: int | None = None) -> tuple[list[list[int]], int]:
        """The outputs, and how many prompts were recomputed here because their server did not answer."""
        if self.transport is None or self.node.state == NodeState.OFFLINE:
            self.counters["served_local"] += len(prompts)
            outputs = self._serve(prompts, max_new_tokens)
            self.entry_exchange.publish()
            return outputs, 0
        self.start()
        reason = "peer_unavailable"
        try:
            outputs = self.rounds.run(prompts, max_new_tokens)
        except (dist.DistError, pybreaker.CircuitBreakerError) as exc:
            # the store itself failed (its breaker is open, or it went away): this round is served here
            logger.warning("rank %d: round %d served locally, the store failed: %s", self.node_id,
                           self.messages.number, exc)
            self.counters["rounds_without_store"] += 1
            if self.metrics is not None:
                self.metrics.record_error(ENTRY_POINT, exc)
            outputs, reason = {}, "store_unavailable"
        missing = [i for i in range(len(prompts)) if i not in outputs]
        if missing:
            self.counters["served_local_fallback"] += len(missing)
            if self.metrics is not None:
                self.metrics.record_fallback(ENTRY_POINT, "generate", reason, len(missing))
            outputs.update(zip(missing, self._serve([prompts[i] for i in missing], max_new_tokens)))
        return [outputs[i] for i in range(len(prompts))], len(missing)

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in prompt if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
            if bad:
                raise ValueError(f"prompt {i} holds token ids {bad[:5]} outside [0, {self.vocab_size})")

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(ENTRY_POINT, outcome).inc()

    def _keys_of(self, prompt: list[int]) -> list[bytes]:
        return [] if self.prompt_keys is None else list(self.prompt_keys(prompt))

    def _serve(self, prompts: list[list[int]], max_new_tokens: int | None = None) -> list[list[int]]:
        if not prompts:
            return []
        if self.serve_batch is None:
            raise ValueError("this coordinator has no `serve_batch`; pass one to serve prompts")
        # a `serve_batch` of one argument serves callers that never name a length
        outputs = self.serve_batch(prompts) if max_new_tokens is None else self.serve_batch(prompts, max_new_tokens)
        if len(outputs) != len(prompts):
            raise ValueError(f"`serve_batch` returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [[int(t) for t in out] for out in outputs]

    # ------------------------------------------------------------------ health and reporting
    def peers_alive(self) -> dict[str, bool]:
        """``{"rank<n>": reachable}`` for every known peer that has not left: False while its breaker is open
        (its prompts are served here). Empty without a transport. For ``serving.peers_check``."""
        return self.cluster.peers_alive()

    @property
    def breakers(self) -> list[pybreaker.CircuitBreaker]:
        """The transport's breakers (one per peer, one for the c10d store); empty without a transport."""
        if self.transport is None:
            return []
        return [*self.transport.breakers.values(), self.transport.c10d_store_breaker]

    def stats(self) -> dict[str, Any]:
        """Counters, breaker states and transitions, ring and directory sizes, and the migration pacing (the
        bandwidth measured to each peer and the batches sent, ``migration_pacing``)."""
        out: dict[str, Any] = {
            **self.counters,
            "node_id": self.node_id,
            "state": self.node.state.value,
            "round": self.messages.number,
            "ring": self.ring.nodes,
            "directory_keys": len(self.directory),
            "migration": self.migration_pacer.stats(),
        }
        if self.transport is not None:
            out["breakers"] = {p: self.transport.breaker_state(p) for p in self.transport.breakers}
            out["breaker_transitions"] = {f"{name}:{state}": n for (name, state), n in self.transport.events.transitions.items()}
            out["transport"] = dict(self.transport.counters)
        return out


def create_distributed_cache_optimizer(
    local_node_id: NodeId = 0,
    replication_factor: int = DistributedConfig.replication_factor,
    *,
    capacity_mb: float = NodeInfo.capacity_mb,
    address: str = "",
    port: int | None = None,
    config: DistributedConfig | None = None,
    **kwargs: Any,
) -> CacheCoordinator:
    """Seed-compatible constructor: a ``CacheCoordinator`` for ``local_node_id`` (a rank, or a name such as
    ``"node-0"`` without a transport; no transport unless given)."""
    base = config or DistributedConfig()
    if replication_factor != base.replication_factor:
        base = dataclasses.replace(base, replication_factor=replication_factor)
    node = NodeInfo(local_node_id, address, capacity_mb, port=port)
    return CacheCoordinator(node, base, **kwargs)
