"""``EntryExchange``: what moves between processes besides prompts: key sets, entries, eviction orders.

- *Directory*: each process publishes its whole key set (with sizes) under
  one store key when it changes, and a version number in its round view;
  others re-read it when the version moves. Whole sets, not deltas, so a
  missed update is repaired by the next one.
- *Migration*: a process sends the chunks ``migration.plan_migration`` gives
  it as numbered batches (the stored quantized blocks, ``torch.save``d),
  sized by ``migration_pacing`` (a time budget per round from the bandwidth
  measured to each target, under a byte cap), one batch in flight per target;
  its view announces how many it sent to each target, and the target imports
  them (and deletes the key) when it reads that view.
- *Global eviction*: an order (bytes per process) is posted once and
  announced the same way; each process frees its share when it reads it.

Placement (the ring, the replication factor) and reachability come from the
``ClusterView``; key sets go to the store only once this process announced
itself there.

What a peer sends is checked before it is used (``wire``, and the adapter's
entry checks for batches; with an ``EntryVerifier``, sampled batches are also
recomputed with this process's model, and one whose values are not the K/V
of their tokens is refused under the reason ``verification``). A bad one is
deleted from the store, counted
against the peer's breaker (``RoundMessages.reject``) and skipped: nothing
it holds is stored, and the sender's next batch may go. Eviction orders are
deleted by their poster ``KEEP_POSTS_ROUNDS`` rounds later.
"""

from __future__ import annotations

import logging
from collections import Counter

from .cluster_view import ClusterView
from .entry_verification import EntryMismatch, EntryUnverifiable, EntryVerifier
from .eviction import plan_local_eviction
from .local_entries import LocalEntries, chains_parent_first
from .migration import plan_migration
from .migration_pacing import MigrationPacer
from .nodes import EntryDirectory, NodeState
from .payloads import PayloadError, decode_entries, encode_entries, encode_json
from .round_messages import RoundMessages
from .transport import StoreTransport
from .wire import parse_directory, parse_evictions

__all__ = ["EntryExchange"]

logger = logging.getLogger(__name__)

_RESEND_AFTER_ROUNDS = 8  # a migrated chunk the directory still does not show at its target is sent again


class EntryExchange:
    """One process's side of the directory, migration and eviction traffic; see the module docstring.

    ``transport`` None: one process; only the local directory is kept.
    ``counters`` is the coordinator's, so that ``stats()`` shows these figures too. ``pacer`` sizes the
    migration batches and times them on the transport's clock.
    """

    def __init__(
        self,
        cluster: ClusterView,
        local_entries: LocalEntries | None,
        directory: EntryDirectory,
        transport: StoreTransport | None,
        counters: Counter[str],
        pacer: MigrationPacer,
        messages: RoundMessages | None = None,
        verifier: EntryVerifier | None = None,
    ):
        self.cluster = cluster
        self.node_id = cluster.node_id
        self.local_entries = local_entries
        self.directory = directory
        self.transport = transport
        self.counters = counters
        self.pacer = pacer
        self.messages = messages
        self.verifier = verifier  # None: batches are checked for form only
        self.directory_version = 0
        self._published_sizes: dict[bytes, int] | None = None
        self._known_versions: dict[int, int] = {}
        self.migrations_sent: Counter[int] = Counter()
        self._migrations_read: Counter[int] = Counter()
        self._recently_sent: dict[tuple[bytes, int], int] = {}
        self.evictions_posted = 0
        self._evictions_read: Counter[int] = Counter()

    def _key(self, *parts: object) -> str:
        return self.transport.key(*parts)

    def announcements(self) -> dict:
        """What this process's round view carries for the others."""
        return {
            "directory_version": self.directory_version,
            "migrations": {str(t): n for t, n in self.migrations_sent.items()},
            "evictions": self.evictions_posted,
        }

    def absorb(self, peer: int, view: dict) -> None:
        """Act on a peer's announcements: re-read its directory, import its batches, apply its orders."""
        self._read_directory(peer, view["directory_version"])
        self._read_migrations(peer, int(view["migrations"].get(str(self.node_id), 0)))
        self._read_evictions(peer, int(view["evictions"]))

    def forget(self, peer: int) -> None:
        """``peer`` is gone or cut off: what it held cannot be served from here."""
        self.directory.drop_node(peer)
        self._known_versions.pop(peer, None)

    def entry_count(self) -> int:
        return 0 if self.local_entries is None else len(self.local_entries.entry_infos())

    # ------------------------------------------------------------------ directory
    def publish(self) -> None:
        """Put this process's key set in the directory and, when it changed and this process announced itself,
        in the store."""
        if self.local_entries is None:
            return
        sizes = {info.key: info.nbytes for info in self.local_entries.entry_infos()}
        if sizes == self._published_sizes:
            return
        self._published_sizes = sizes
        self.directory.replace_node(self.node_id, sizes)
        if self.transport is not None and self.cluster.announced:
            self.directory_version += 1
            message = {"version": self.directory_version, "sizes": {k.hex(): n for k, n in sizes.items()}}
            self.transport.post(self._key("directory", self.node_id), encode_json(message))

    def _read_directory(self, peer: int, version: int) -> None:
        if self._known_versions.get(peer) == version:
            return
        key = self._key("directory", peer)
        data = self.transport.read_or_none(key, peer)
        if data is None:
            return
        try:
            version, sizes = parse_directory(data)
        except PayloadError as exc:
            self.messages.reject(peer, key, str(exc))
            return
        self.directory.replace_node(peer, sizes)
        self._known_versions[peer] = version

    # ------------------------------------------------------------------ migration
    def migration_step(self, round_no: int) -> None:
        """Send this round's share of the migration plan; drop what owners now hold (when draining: an ACTIVE
        process keeps its copies)."""
        if self.local_entries is None or self.transport is None:
            return
        infos = self.local_entries.entry_infos()
        self._recently_sent = {k: r for k, r in self._recently_sent.items() if round_no - r < _RESEND_AFTER_ROUNDS}
        plan = plan_migration(
            self.node_id, infos, self.cluster.ring, self.directory, self.cluster.replication_factor,
            skip=self._recently_sent, keep_copies=self.cluster.node.state == NodeState.ACTIVE,
        )
        sizes = {info.key: info.nbytes for info in infos}
        pending: dict[int, list[bytes]] = {}
        for transfer in plan.transfers:
            pending.setdefault(transfer.target, []).extend(transfer.keys)
        # one batch in flight per target: the next goes once the last was read
        ready = {t: keys for t, keys in pending.items() if self.cluster.reachable(t) and not self._in_flight(t)}
        for step in self.pacer.plan_step(ready, sizes, turn=round_no):
            target = step.target
            started = self.transport.clock()
            payloads = self.local_entries.export_entries(step.keys)
            if not payloads:
                continue
            self.migrations_sent[target] += 1
            self.transport.post(self._batch_key(self.node_id, target), encode_entries(payloads))
            self.pacer.record(target, step.nbytes, len(payloads), self.transport.clock() - started)
            for key in step.keys:
                self._recently_sent[(key, target)] = round_no
            self.counters["migrated_out_entries"] += len(payloads)
            self.counters["migrated_out_bytes"] += step.nbytes
            self.counters["migration_steps"] += 1
            self.counters["largest_migration_step_bytes"] = max(self.counters["largest_migration_step_bytes"], step.nbytes)
        if plan.drops:
            self.counters["handed_over_bytes"] += self.local_entries.remove_entries(plan.drops)
            self.publish()  # rounds run only after `start` announced this process: this posts the new key set

    def _in_flight(self, target: int) -> bool:
        return bool(self.migrations_sent[target]) and self.transport.exists(self._batch_key(self.node_id, target))

    def _batch_key(self, source: int, target: int, number: int | None = None) -> str:
        number = self.migrations_sent[target] if number is None else number
        return self._key("migrate", source, target, number)

    def _read_migrations(self, peer: int, announced: int) -> None:
        while self._migrations_read[peer] < announced:
            self._migrations_read[peer] += 1
            key = self._batch_key(peer, self.node_id, self._migrations_read[peer])
            data = self.transport.read_or_none(key, peer)
            if data is None:
                continue
            stored = 0
            try:
                stored = self._import(peer, decode_entries(data)) if self.local_entries else 0
            except EntryUnverifiable as exc:  # not the peer's fault: this process never saw those tokens
                self.counters["unverifiable_migration_batches"] += 1
                logger.info("rank %d: a batch of rank %d not stored: %s", self.node_id, peer, exc)
            except EntryMismatch as exc:
                self.counters["rejected_migration_batches"] += 1
                self.messages.reject(peer, key, str(exc), reason="verification")
            except PayloadError as exc:
                self.counters["rejected_migration_batches"] += 1
                self.messages.reject(peer, key, str(exc))
            finally:
                self.transport.delete([key])  # also tells the sender the next batch may go
            self.counters["migrated_in_entries"] += stored
            self.counters["migrated_in_bytes"] += len(data)

    def _import(self, peer: int, payloads: list[dict]) -> int:
        """Store a peer's batch; recomputed first when the verifier samples it."""
        if self.verifier is None or not self.verifier.wants(peer):
            return self.local_entries.import_entries(payloads)
        stored = self.local_entries.import_entries(payloads, verify=self.verifier.check)
        self.verifier.passed(peer)
        self.counters["verified_migration_batches"] += 1
        return stored

    # ------------------------------------------------------------------ global eviction
    def post_eviction(self, shares: dict[int, int]) -> None:
        self.evictions_posted += 1
        # announced in the next round's view: deleted like that round's own posts
        self.messages.post(self.messages.number + 1, self._key("evict", self.node_id, self.evictions_posted),
                           encode_json({str(n): b for n, b in shares.items()}))

    def _read_evictions(self, peer: int, announced: int) -> None:
        while self._evictions_read[peer] < announced:
            self._evictions_read[peer] += 1
            key = self._key("evict", peer, self._evictions_read[peer])
            data = self.transport.read_or_none(key, peer)
            if data is None:
                continue
            try:
                shares = parse_evictions(data)
            except PayloadError as exc:
                self.messages.reject(peer, key, str(exc))
                continue
            self.evict_share(shares.get(str(self.node_id), 0))

    def evict_share(self, share_bytes: int) -> int:
        """Free at least ``share_bytes`` here: unowned copies, then replicas, then sole copies; coldest first.
        Then publish the key set. Returns the bytes freed."""
        freed = self._evict(share_bytes)
        self.publish()
        return freed

    def _evict(self, share_bytes: int) -> int:
        if self.local_entries is None or share_bytes <= 0:
            return 0
        infos = self.local_entries.entry_infos()
        replicated = {
            info.key
            for info in infos
            if any(self.cluster.reachable(n) for n in self.directory.holders(info.key) if n != self.node_id)
        }
        owned = {
            info.key
            for root, chain in chains_parent_first(infos).items()
            if self.node_id in self.cluster.placement(root)
            for info in chain
        }
        freed = self.local_entries.remove_entries(plan_local_eviction(infos, share_bytes, replicated, owned))
        self.counters["evicted_bytes"] += freed
        return freed
