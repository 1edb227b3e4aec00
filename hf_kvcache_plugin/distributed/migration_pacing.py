"""How much a migration step sends to each peer: batches sized by the bandwidth measured to that peer.

Each batch a process sends is timed (exporting the entries, serialising them,
writing them into the store: what the step costs this process) and its
achieved MiB/s feeds an exponential moving average per target peer, seeded
by ``initial_mb_per_s`` (conservative: until a peer has been measured its
batches stay small). A step then gets:

- a time budget (``time_budget_s``) shared by all its batches: each peer
  with entries pending gets an equal share of the time (what one does not
  use goes to the next), and its batch is what that peer's bandwidth moves
  in its share, so a slow peer gets a smaller batch than a fast one;
- a byte cap (``max_bytes_per_step``, the old fixed limit) over all of it;
- no starvation: the step's first batch takes at least one entry, even one
  larger than both budgets (it then goes alone), and the order of the peers
  turns every round, so each pending peer is first in turn.

Keys stay in the plan's order (parents first); a batch is a prefix of its
target's pending keys, so nothing pending is skipped, only left for a later
step. The figures (MiB/s per peer, the batches chosen) go to the
coordinator's ``stats()["migration"]`` and, given a ``ServingMetrics``, to
``hf_kvcache_migration_bandwidth_mb_per_s`` and
``hf_kvcache_migration_batch_bytes``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..resilience.metrics import ServingMetrics
from .migration import Transfer

__all__ = ["MigrationPacer", "PeerBandwidth"]

MIB = 2**20
EMA_WEIGHT = 0.3  # of the newest measurement: a few batches move the estimate, one outlier does not own it


@dataclass
class PeerBandwidth:
    """What was measured sending migration batches to one peer."""

    mb_per_s: float  # the estimate batches are sized by (MiB/s): the seed until a batch was timed
    measured_batches: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    last_batch_bytes: int = 0
    last_batch_entries: int = 0
    largest_batch_bytes: int = 0


class MigrationPacer:
    """Sizes each migration step's batches to a time budget from per-peer bandwidth; see the module docstring.

    Args:
        time_budget_s: seconds one step may spend sending, all peers together.
        max_bytes_per_step: bytes one step may send, all peers together.
        initial_mb_per_s: the bandwidth assumed for a peer not measured yet (MiB/s).
        metrics: where the estimate and the batch sizes are exported; None for nowhere.
        rank: this process's label in the metrics.
    """

    def __init__(
        self,
        time_budget_s: float,
        max_bytes_per_step: int,
        initial_mb_per_s: float,
        *,
        metrics: ServingMetrics | None = None,
        rank: object = 0,
    ):
        for name, value in (("time_budget_s", time_budget_s), ("max_bytes_per_step", max_bytes_per_step),
                            ("initial_mb_per_s", initial_mb_per_s)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"`{name}` has to be a positive number but got {value!r}")
        self.time_budget_s = float(time_budget_s)
        self.max_bytes_per_step = int(max_bytes_per_step)
        self.initial_mb_per_s = float(initial_mb_per_s)
        self.peers: dict[int, PeerBandwidth] = {}
        self.rank = str(rank)
        self._bandwidth_gauge = self._batch_histogram = None
        if metrics is not None:
            self._bandwidth_gauge = metrics.gauge(
                "hf_kvcache_migration_bandwidth_mb_per_s",
                "Estimated bandwidth of migration batches to a peer (EMA of measured MiB/s)", ["rank", "peer"],
            )
            self._batch_histogram = metrics.histogram(
                "hf_kvcache_migration_batch_bytes", "Bytes of each migration batch sent", ["rank", "peer"],
                buckets=tuple(2**p for p in range(10, 31, 2)),
            )

    def _peer(self, peer: int) -> PeerBandwidth:
        if peer not in self.peers:
            self.peers[peer] = PeerBandwidth(self.initial_mb_per_s)
        return self.peers[peer]

    def bytes_per_s(self, peer: int) -> float:
        return self._peer(peer).mb_per_s * MIB

    def plan_step(self, pending: Mapping[int, Sequence[bytes]], sizes: Mapping[bytes, int], turn: int = 0) -> list[Transfer]:
        """This step's batches: per target in ``pending`` (keys in send order), a prefix of its keys.

        ``turn`` (the round number) rotates which target goes first. The estimated seconds of all batches stay
        within the time budget and their bytes within the byte cap, except that the first batch holds at least
        one entry."""
        targets = sorted(pending)
        if targets:
            shift = turn % len(targets)
            targets = targets[shift:] + targets[:shift]
        seconds_left, bytes_left = self.time_budget_s, self.max_bytes_per_step
        steps: list[Transfer] = []
        for n, target in enumerate(targets):
            rate = self.bytes_per_s(target)
            share = seconds_left / (len(targets) - n)  # an equal share of the time left; what one leaves, the next use
            allowance = min(bytes_left, int(rate * share))
            keys: list[bytes] = []
            total = 0
            for key in pending[target]:
                size = sizes[key]
                if total + size > allowance and (keys or steps):
                    break
                keys.append(key)
                total += size
                if total > allowance:  # the step's first entry, over the budget: it goes alone
                    break
            if not keys:
                continue
            steps.append(Transfer(target, tuple(keys), total))
            seconds_left = max(0.0, seconds_left - total / rate)
            bytes_left = max(0, bytes_left - total)
        return steps

    def record(self, peer: int, nbytes: int, entries: int, seconds: float) -> None:
        """A batch of ``nbytes`` (``entries`` entries) took ``seconds`` to send to ``peer``: update its estimate."""
        link = self._peer(peer)
        link.bytes_sent += nbytes
        link.last_batch_bytes, link.last_batch_entries = nbytes, entries
        link.largest_batch_bytes = max(link.largest_batch_bytes, nbytes)
        if seconds > 0 and nbytes > 0:  # a clock too coarse to see the batch says nothing of the bandwidth
            link.seconds += seconds
            measured = nbytes / seconds / MIB
            link.mb_per_s = measured if link.measured_batches == 0 else (
                (1 - EMA_WEIGHT) * link.mb_per_s + EMA_WEIGHT * measured)
            link.measured_batches += 1
        if self._bandwidth_gauge is not None:
            self._bandwidth_gauge.labels(self.rank, str(peer)).set(link.mb_per_s)
            self._batch_histogram.labels(self.rank, str(peer)).observe(nbytes)

    def stats(self) -> dict[str, Any]:
        """The budgets and, per peer, the bandwidth estimate and the batches sent."""
        return {
            "time_budget_ms": self.time_budget_s * 1000,
            "max_bytes_per_step": self.max_bytes_per_step,
            "initial_mb_per_s": self.initial_mb_per_s,
            "peers": {peer: asdict(link) for peer, link in sorted(self.peers.items())},
        }
