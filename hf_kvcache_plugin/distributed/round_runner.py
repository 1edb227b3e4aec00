"""``RoundRunner``: one round of the shared cache, from this process's prompts to their outputs.

Every process runs one round per ``generate`` call (the usual data-parallel
loop); a round is:

1. post a *view* (this process's prompts with their chunk keys, its state,
   its directory version, migration and eviction announcements) and read every
   reachable peer's view; take in what the views say (peer states, directories,
   migration batches, eviction orders);
2. compute the routing plan (``routing.plan_routes``), identical everywhere;
3. serve the prompts routed here, from any process, with the local prefix
   store; post each origin its results (an empty message where nothing was
   served, so nobody waits for what will not come);
4. read the results of prompts served elsewhere;
5. one migration step (``entry_exchange``): send chunks whose owners lack
   them, at most ``migration_mb_per_step``; a draining process drops what
   every owner now holds.

``run`` returns the outputs that came, by prompt index; the coordinator
serves whatever is missing (dead peer, open breaker, diverging plan, a
message refused) locally.

Peers' messages are parsed by ``wire`` before use; one that does not parse
(or names tokens outside the vocabulary) is dropped and counted against its
sender's breaker, and the round goes on without it. Chunk keys are computed
here from the prompts, never taken from a peer. Whatever happens in a round,
its old posts are deleted at its end.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import DistributedConfig
from .cluster_view import ClusterView
from .entry_exchange import EntryExchange
from .nodes import EntryDirectory, NodeInfo, NodeState
from .payloads import PayloadError, decode_json, encode_json
from .round_messages import RoundMessages
from .routing import Route, RouteRequest, plan_routes
from .wire import parse_results, parse_view

__all__ = ["RoundRunner", "RoundState"]

logger = logging.getLogger(__name__)

Serve = Callable[..., list[list[int]]]  # (prompts, max_new_tokens=None) -> new tokens of each
KeysOf = Callable[[list[int]], list[bytes]]


@dataclass
class RoundState:
    """What one round gathered: every view read (this process's too) and the plan made from them."""

    number: int
    views: dict[int, dict[str, Any]] = field(default_factory=dict)
    keys: dict[int, list[list[bytes]]] = field(default_factory=dict)  # chunk keys of each view's prompts
    nodes: dict[int, NodeInfo] = field(default_factory=dict)  # each peer's record, from its view
    routes: dict[tuple[int, int], Route] = field(default_factory=dict)


class RoundRunner:
    """Runs this process's rounds; see the module docstring.

    Args:
        serve: generates for a batch of prompts with the local prefix store (the coordinator's checked
            ``serve_batch``).
        keys_of: the chained chunk keys of a prompt (the coordinator's ``prompt_keys``).
        counters: the coordinator's (prompts served here, for others, sent to others; planned hits).
        vocab_size: token ids a peer's prompt or result may hold are below it; None: not checked.
    """

    def __init__(
        self,
        cluster: ClusterView,
        messages: RoundMessages,
        entry_exchange: EntryExchange,
        directory: EntryDirectory,
        config: DistributedConfig,
        counters: Counter[str],
        serve: Serve,
        keys_of: KeysOf,
        vocab_size: int | None = None,
    ):
        self.cluster = cluster
        self.messages = messages
        self.entry_exchange = entry_exchange
        self.directory = directory
        self.config = config
        self.counters = counters
        self.serve = serve
        self.keys_of = keys_of
        self.vocab_size = vocab_size
        self.last_routes: dict[tuple[int, int], Route] = {}  # the latest round's plan, (origin, index) -> route

    @property
    def node_id(self) -> int:
        return self.cluster.node_id

    def run(self, prompts: list[list[int]], max_new_tokens: int | None = None) -> dict[int, list[int]]:
        """One round (see the module docstring); returns the outputs that came, by prompt index.

        ``max_new_tokens`` travels with this process's prompts: whoever serves them generates that many."""
        state = RoundState(self.messages.begin())
        try:
            state.keys[self.node_id] = [self.keys_of(p) for p in prompts]
            self.entry_exchange.publish()
            view = self._view(prompts, max_new_tokens)
            body = encode_json(view)
            if len(body) > self.messages.transport.max_payload_bytes:
                # too big to send: this process's prompts stay out of the plan and are served here
                self.counters["views_over_payload_cap"] += 1
                view, state.keys[self.node_id] = self._view([]), []
                body = encode_json(view)
            state.views[self.node_id] = view
            self.messages.post(state.number, self.messages.view_key(state.number, self.node_id), body)
            self._read_views(state)
            self._absorb_views(state)
            state.routes = self._plan(state)
            self.last_routes = state.routes
            outputs = self._serve_round(state)
            outputs.update(self._collect_results(state, len(prompts)))
            self.entry_exchange.publish()
            self.entry_exchange.migration_step(state.number)
            return outputs
        finally:
            self.messages.forget_settled()  # every round old enough, skipped ones and failed ones too

    def _view(self, prompts: list[list[int]], max_new_tokens: int | None = None) -> dict[str, Any]:
        view = {"node": decode_json(self.cluster.node.to_json()), "prompts": prompts,
                **self.entry_exchange.announcements()}  # fmt: skip
        if max_new_tokens is not None:  # absent otherwise: the view of a process that never sets it is unchanged
            view["max_new_tokens"] = max_new_tokens
        return view

    def _read_views(self, state: RoundState) -> None:
        for peer in self.cluster.peers_to_hear():
            # kept, not deleted: every peer reads this view; its poster deletes it later
            key = self.messages.view_key(state.number, peer)
            message = self.messages.receive(peer, key, state.number, delete=False)
            if message is None:
                continue
            try:
                view, node = parse_view(message, peer, self.vocab_size)
                keys = [self.keys_of(p) for p in view.prompts]
            except PayloadError as exc:
                self.messages.reject(peer, key, str(exc))
                continue
            state.views[peer] = view.model_dump()
            state.nodes[peer] = node
            state.keys[peer] = keys

    def _absorb_views(self, state: RoundState) -> None:
        for peer, view in state.views.items():
            if peer == self.node_id:
                continue
            self.cluster.absorb_node(peer, state.nodes[peer])
            self.entry_exchange.absorb(peer, view)
        self.cluster.discover_nodes()
        self.cluster.refresh_ring()

    def _plan(self, state: RoundState) -> dict[tuple[int, int], Route]:
        """The routes of every prompt of the round, from every view read (the same plan in every process that
        read the same views)."""
        requests = [
            RouteRequest(origin, i, tuple(prompt_keys))
            for origin in state.views
            for i, prompt_keys in enumerate(state.keys[origin])
        ]
        servers = [n for n in state.views if state.views[n]["node"]["state"] == NodeState.ACTIVE.value]
        return plan_routes(
            requests, self.cluster.ring, self.directory, servers, self.config.replication_factor,
            self.config.load_slack,
        )

    def _serve_round(self, state: RoundState) -> dict[int, list[int]]:
        """Serve what the plan gives this process; post each origin its part. Returns this process's own."""
        mine = sorted(key for key, route in state.routes.items() if route.server == self.node_id)
        try:
            served = {}
            # one generate per length asked for (origins may ask for different ones)
            for new_tokens in sorted({state.views[o].get("max_new_tokens") for o, _ in mine}, key=str):
                part = [(o, i) for o, i in mine if state.views[o].get("max_new_tokens") == new_tokens]
                batch = [state.views[origin]["prompts"][i] for origin, i in part]
                served.update(zip(part, self.serve(batch, new_tokens)))
        except Exception as exc:  # noqa: BLE001 - a peer's prompt must not fail this process's round
            if all(origin == self.node_id for origin, _ in mine):
                raise
            # every origin recomputes its own prompts (and gets its own error, if the prompt is the cause)
            logger.warning("rank %d: serving round %d for peers failed: %r", self.node_id, state.number, exc)
            self.counters["serve_failures_for_peers"] += 1
            served = {}
        for origin, i in mine:
            self.counters["served_for_others" if origin != self.node_id else "served_here"] += 1
            self.counters["planned_hit_chunks"] += state.routes[(origin, i)].hit_chunks
        for peer in self.cluster.present_peers():
            results = {str(i): out for (origin, i), out in served.items() if origin == peer}
            key = self.messages.result_key(state.number, self.node_id, peer)
            self.messages.post(state.number, key, encode_json(results))
        return {i: out for (origin, i), out in served.items() if origin == self.node_id}

    def _collect_results(self, state: RoundState, count: int) -> dict[int, list[int]]:
        outputs: dict[int, list[int]] = {}
        servers = sorted(
            {r.server for (origin, _), r in state.routes.items() if origin == self.node_id and r.server != self.node_id}
        )
        for server in servers:
            self.counters["sent_to_others"] += sum(
                1 for (o, _), r in state.routes.items() if o == self.node_id and r.server == server
            )
            key = self.messages.result_key(state.number, server, self.node_id)
            message = self.messages.receive(server, key, state.number)
            if message is None:
                continue
            expected = {i for (o, i), r in state.routes.items() if o == self.node_id and r.server == server}
            try:
                outputs.update(parse_results(message, expected, self.vocab_size))
            except PayloadError as exc:
                self.messages.reject(server, key, str(exc))  # its prompts are recomputed here
        return outputs
