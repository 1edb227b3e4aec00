"""Which stored entries move where when the ring changes: pure planning, no I/O.

Placement is per chain: every chunk of a prompt lives with its first chunk
(the root), on the ``replication_factor`` ring owners of the root's key; a
chunk cannot be used without its parents, so a chain never spreads.

One process plans for the entries it holds. For each chain:

- each chunk's *source* is one holder chosen the same way by every holder
  (the first owner that holds it, in ring order; else the lowest-ranked
  holder), so a chunk is sent once, not once per copy;
- the source sends each owner the chunks the directory says it lacks,
  parents first (this is also how new entries get their replicas);
- a process that drains drops its copy of a chain once every owner holds all
  of it, and leaves when nothing is left. An active process keeps the copies
  it does not own (served prompts a hot prefix spilled onto it, or it lost
  ownership when another process joined): they are extra replicas that the
  router uses and that the store's LRU and global eviction remove first.

Transfers are cut into steps of at most ``max_bytes_per_step`` bytes (one
entry larger than that goes alone); entries travel as stored, never
re-quantized.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .hash_ring import ConsistentHashRing, NodeId, node_order
from .local_entries import EntryInfo, chains_parent_first
from .nodes import EntryDirectory

__all__ = ["MigrationPlan", "Transfer", "plan_migration", "split_into_steps"]


@dataclass(frozen=True)
class Transfer:
    """Entries for one target, parents before children."""

    target: int
    keys: tuple[bytes, ...]
    nbytes: int


@dataclass
class MigrationPlan:
    transfers: list[Transfer] = field(default_factory=list)
    drops: list[bytes] = field(default_factory=list)  # keys a draining process may remove: every owner has them

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.transfers)


def _source(holders: set[NodeId], owners: list[NodeId]) -> NodeId:
    """The one holder that sends a chunk: the first owner holding it, else the lowest-ranked holder."""
    for node_id in owners:
        if node_id in holders:
            return node_id
    return min(holders, key=node_order)


def plan_migration(
    self_id: int,
    entries: Sequence[EntryInfo],
    ring: ConsistentHashRing,
    directory: EntryDirectory,
    replication_factor: int = 1,
    skip: Iterable[tuple[bytes, int]] = (),
    keep_copies: bool = True,
) -> MigrationPlan:
    """What ``self_id`` sends and drops so its chains end up on their owners.

    ``ring`` holds the processes that may own keys (active and reachable; not
    draining ones). ``directory`` says what the others hold; this process's
    own holdings are ``entries``. ``skip``: (key, target) pairs already sent
    and not yet visible in the directory. ``keep_copies=False`` (draining):
    drop every chain all of whose owners hold it.
    """
    plan = MigrationPlan()
    if len(ring) == 0:
        return plan
    skip = set(skip)
    for root, chain in chains_parent_first(entries).items():
        owners = ring.get_nodes(root, replication_factor)
        sends: dict[int, list[EntryInfo]] = {}
        complete = True  # every owner holds every chunk of the chain
        for info in chain:
            holders = directory.holders(info.key) | {self_id}
            sender = _source(holders, owners)
            for owner in owners:
                if owner in holders:
                    continue
                complete = False
                if sender == self_id and (info.key, owner) not in skip:
                    sends.setdefault(owner, []).append(info)
        for owner, infos in sends.items():
            plan.transfers.append(Transfer(owner, tuple(i.key for i in infos), sum(i.nbytes for i in infos)))
        if not keep_copies and self_id not in owners and complete:
            plan.drops.extend(i.key for i in chain if not i.pinned)
    return plan


def split_into_steps(transfers: Sequence[Transfer], sizes: dict[bytes, int], max_bytes_per_step: int) -> list[Transfer]:
    """Per target, the transfers' keys (in order, so parents stay first) cut into steps of at most
    ``max_bytes_per_step`` bytes; a single entry larger than that is a step of its own."""
    if max_bytes_per_step < 1:
        raise ValueError(f"`max_bytes_per_step` has to be >= 1 but got {max_bytes_per_step}")
    by_target: dict[int, list[bytes]] = {}
    for transfer in transfers:
        by_target.setdefault(transfer.target, []).extend(transfer.keys)
    steps = []
    for target, all_keys in by_target.items():
        keys: list[bytes] = []
        total = 0
        for key in all_keys:
            size = sizes[key]
            if keys and total + size > max_bytes_per_step:
                steps.append(Transfer(target, tuple(keys), total))
                keys, total = [], 0
            keys.append(key)
            total += size
        if keys:
            steps.append(Transfer(target, tuple(keys), total))
    return steps
