"""``RoundMessages``: round numbers, and this process's per-round messages over the transport.

A round's messages are keys of the c10d store named after the round:
``round/<n>/view/<rank>`` (each process's view, read by every peer) and
``round/<n>/result/<server>/<origin>`` (what a server generated for an origin).
Each rank also keeps its round number in a counter key, ``round_no/<rank>``;
a peer waiting for its messages reads it to tell "behind or ahead" (nothing to
wait for) from "dead" (see ``transport``).

Round numbers: a round begins one past this process's last one, or at the
highest round a reachable peer is in, so a rank that fell behind (stalled,
restarted its loop) jumps to the others' round and one stall does not
desynchronise the cluster.

Receiving never raises: a message that did not come is counted
(``missed_<reason>``), logged, reported to the ``ClusterView`` (a peer that
left, or whose breaker opened, leaves the ring) and answered as None.

One deadline per round: every wait of a round ends ``round_deadline_s``
after the round began, however many peers are waited for, so a round costs
at most that (plus serving) whatever the peers do. Own messages (and
eviction orders) are deleted ``KEEP_POSTS_ROUNDS`` rounds after they were
posted (a peer one round behind may still be reading them): every round at
least that old is forgotten at the end of each round, skipped rounds too.
"""

from __future__ import annotations

import logging
from collections import Counter

import pybreaker
import torch.distributed as dist

from ..config import DistributedConfig
from .cluster_view import ClusterView
from .signing import BadMessage
from .transport import PeerLeft, PeerUnavailable, StoreTransport

__all__ = ["KEEP_POSTS_ROUNDS", "RoundMessages"]

logger = logging.getLogger(__name__)

KEEP_POSTS_ROUNDS = 2  # own messages are deleted this many rounds later (peers one round behind still read them)


class RoundMessages:
    """This process's side of the per-round messages; see the module docstring.

    ``counters`` is the coordinator's (``stats()`` shows rounds, skipped rounds and missed messages).
    ``config.round_deadline_s`` bounds every wait of a round together.
    """

    def __init__(
        self, cluster: ClusterView, transport: StoreTransport | None, config: DistributedConfig, counters: Counter[str]
    ):
        self.cluster = cluster
        self.transport = transport
        self.config = config
        self.counters = counters
        self.number = 0  # the round this process is in (0: none yet)
        self.deadline = 0.0  # on the transport's clock: when the current round stops waiting for peers
        self._posted: dict[int, list[str]] = {}  # round -> keys this process posted in it

    def view_key(self, round_no: int, rank: int) -> str:
        return self.transport.key("round", round_no, "view", rank)

    def result_key(self, round_no: int, server: int, origin: int) -> str:
        return self.transport.key("round", round_no, "result", server, origin)

    def begin(self) -> int:
        """Enter the next round (or the furthest round a reachable peer is in) and say so; returns its number."""
        theirs = [self.peer_round(p) for p in self.cluster.peers_to_hear()]
        number = max([self.number + 1, *theirs])
        if number > self.number + 1:
            self.counters["rounds_skipped"] += number - self.number - 1
        self.transport.mark_progress()
        self.deadline = self.transport.clock() + self.config.round_deadline_s
        self.transport.add(self.transport.key("round_no", self.cluster.node_id), number - self.number)
        self.number = number
        self.counters["rounds"] += 1
        return number

    def peer_round(self, peer: int) -> int:
        return self.transport.add(self.transport.key("round_no", peer), 0)

    def post(self, round_no: int, key: str, payload: bytes) -> None:
        """Post a message of round ``round_no``; it is deleted ``KEEP_POSTS_ROUNDS`` rounds later."""
        self.transport.post(key, payload)
        self._posted.setdefault(round_no, []).append(key)

    def receive(self, peer: int, key: str, round_no: int, delete: bool = True) -> bytes | None:
        """A peer's message, or None when it did not come (the reason is logged and counted)."""
        try:
            return self.transport.receive(
                peer,
                key,
                max(0.0, self.deadline - self.transport.clock()),
                round_no=round_no,
                peer_round=self.peer_round,
                peer_left=self.cluster.peer_left,
                delete=delete,
            )
        except (PeerUnavailable, BadMessage, pybreaker.CircuitBreakerError, dist.DistError) as exc:
            # a DistError is the store failing under a wait: it counts against the peer waited for
            self.counters[f"missed_{type(exc).__name__}"] += 1
            logger.info("rank %d, round %d: %s", self.cluster.node_id, round_no, exc)
            self.cluster.note_missed(peer, left=isinstance(exc, PeerLeft))
            return None

    def reject(self, peer: int, key: str, problem: str, reason: str = "malformed") -> None:
        """A signed message of ``peer`` that cannot be used: dropped and counted against its breaker (which may
        take it off the ring)."""
        self.counters["rejected_messages"] += 1
        self.transport.reject(peer, key, problem, reason)
        self.cluster.note_missed(peer, left=False)

    def forget(self, round_no: int) -> None:
        """Delete this process's messages of round ``round_no`` (a failing store only logs)."""
        for key in self._posted.pop(round_no, []):
            try:
                self.transport.delete([key])
            except (dist.DistError, pybreaker.CircuitBreakerError) as exc:
                logger.info("rank %d: could not delete %s: %s", self.cluster.node_id, key, exc)

    def forget_settled(self) -> None:
        """Delete the messages of every round old enough; the last rounds' stay (a peer may still read them)."""
        for round_no in [r for r in self._posted if r <= self.number - KEEP_POSTS_ROUNDS]:
            self.forget(round_no)
