"""Pure planning of the coordinator, in-process: routing, migration, eviction, the directory."""

from __future__ import annotations

import hashlib

import pytest

from hf_kvcache_plugin.distributed import (
    ConsistentHashRing,
    EntryDirectory,
    EntryInfo,
    RouteRequest,
    Transfer,
    eviction_shares,
    plan_local_eviction,
    plan_migration,
    plan_routes,
    split_into_steps,
)


def key(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=32).digest()


def chain_keys(prefix: int, depth: int) -> tuple[bytes, ...]:
    """Chained keys as the store makes them: key k names chunks 0..k of prompt ``prefix``."""
    keys, parent = [], b"ns"
    for _ in range(depth):
        parent = hashlib.blake2b(parent + bytes([prefix]), digest_size=32).digest()
        keys.append(parent)
    return tuple(keys)


def ring_of(*nodes: int) -> ConsistentHashRing:
    return ConsistentHashRing(virtual_nodes=64, nodes=dict.fromkeys(nodes, 1.0))


# ---------------------------------------------------------------------- routing
def test_a_prompt_goes_to_the_holder_of_its_longest_stored_prefix():
    ring, directory = ring_of(0, 1, 2), EntryDirectory()
    keys = chain_keys(7, 3)
    directory.add(keys[0], 100, [0, 2])
    directory.add(keys[1], 100, [2])  # rank 2 holds two chunks, rank 0 one
    plan = plan_routes([RouteRequest(1, 0, keys)], ring, directory, [0, 1, 2])
    route = plan[(1, 0)]
    assert (route.server, route.reason, route.hit_chunks) == (2, "prefix", 2)


def test_among_replicas_the_less_loaded_serves():
    ring, directory = ring_of(0, 1, 2), EntryDirectory()
    hot = chain_keys(1, 2)
    for k in hot:
        directory.add(k, 100, [0, 1])
    requests = [RouteRequest(2, i, hot) for i in range(4)]
    plan = plan_routes(requests, ring, directory, [0, 1, 2], load_slack=1.0)
    servers = sorted(plan[(2, i)].server for i in range(4))
    assert servers == [0, 0, 1, 1]
    assert all(plan[(2, i)].reason == "prefix" for i in range(4))


def test_unstored_prompts_sharing_a_beginning_meet_on_its_ring_owner():
    ring, directory = ring_of(0, 1, 2), EntryDirectory()
    shared = chain_keys(3, 1)[0]
    requests = [RouteRequest(origin, 0, (shared, key("tail", origin))) for origin in range(3)]
    plan = plan_routes(requests, ring, directory, [0, 1, 2], load_slack=2.0)  # cap 3: no spill
    assert {plan[(o, 0)].server for o in range(3)} == {ring.get_node(shared)}
    assert all(plan[(o, 0)].reason == "placement" for o in range(3))


def test_prompts_without_a_full_chunk_are_balanced_preferring_their_origin():
    ring, directory = ring_of(0, 1), EntryDirectory()
    requests = [RouteRequest(0, i, ()) for i in range(4)] + [RouteRequest(1, 0, ())]
    plan = plan_routes(requests, ring, directory, [0, 1], load_slack=0.0)
    loads = [sum(r.server == n for r in plan.values()) for n in (0, 1)]
    assert sorted(loads) == [2, 3]
    assert plan[(1, 0)].server == 1  # a tie goes to the origin: no transfer
    assert all(r.reason == "balanced" for r in plan.values())


def test_bounded_load_spills_a_hot_prefix_and_caps_every_process():
    ring, directory = ring_of(0, 1, 2), EntryDirectory()
    hot = chain_keys(5, 2)
    for k in hot:
        directory.add(k, 100, [0])
    requests = [RouteRequest(o, i, hot) for o in range(3) for i in range(4)]
    plan = plan_routes(requests, ring, directory, [0, 1, 2], load_slack=0.25)
    loads = {n: sum(r.server == n for r in plan.values()) for n in range(3)}
    assert max(loads.values()) <= 5  # ceil(1.25 * 12 / 3)
    assert loads[0] == 5 and sum(r.reason == "prefix" for r in plan.values()) == 5


def test_unavailable_processes_are_never_chosen_and_no_process_means_local():
    ring, directory = ring_of(0, 1, 2), EntryDirectory()
    keys = chain_keys(9, 2)
    for k in keys:
        directory.add(k, 100, [1])
    plan = plan_routes([RouteRequest(0, 0, keys)], ring, directory, [0, 2])
    assert plan[(0, 0)].server in (0, 2)
    assert plan_routes([RouteRequest(0, 0, keys)], ring, directory, [])[(0, 0)].reason == "local"


def test_the_plan_does_not_depend_on_request_order():
    ring, directory = ring_of(0, 1, 2), EntryDirectory()
    requests = [RouteRequest(o, i, chain_keys(i % 3, 2)) for o in range(3) for i in range(5)]
    assert plan_routes(requests, ring, directory, [0, 1, 2]) == plan_routes(requests[::-1], ring, directory, [2, 1, 0])


def test_routing_rejects_bad_settings():
    with pytest.raises(ValueError, match="`replication_factor` has to be >= 1"):
        plan_routes([], ring_of(0), EntryDirectory(), [0], replication_factor=0)
    with pytest.raises(ValueError, match="`load_slack` has to be >= 0"):
        plan_routes([], ring_of(0), EntryDirectory(), [0], load_slack=-1)


# ---------------------------------------------------------------------- migration
def entries_of(prefix: int, depth: int, nbytes: int = 1000, tick: int = 0) -> list[EntryInfo]:
    keys = chain_keys(prefix, depth)
    return [EntryInfo(k, keys[i - 1] if i else None, nbytes, tick + i) for i, k in enumerate(keys)]


def test_a_join_sends_about_one_nth_of_the_chains_to_the_newcomer_parents_first():
    ring = ring_of(0)
    local = [e for p in range(200) for e in entries_of(p, 2)]
    directory = EntryDirectory()
    for e in local:
        directory.add(e.key, e.nbytes, [0])
    ring.add_node(1)
    plan = plan_migration(0, local, ring, directory)
    sent = [k for t in plan.transfers for k in t.keys]
    assert {t.target for t in plan.transfers} == {1}
    assert 0.35 < len(sent) / len(local) < 0.65  # ideal 1/2
    for t in plan.transfers:
        parents = {e.key: e.parent for e in local}
        seen: set[bytes] = set()
        for k in t.keys:
            assert parents[k] is None or parents[k] in seen
            seen.add(k)
    assert plan.drops == []  # an active process keeps its copies


def test_a_draining_process_sends_everything_and_drops_only_what_owners_confirm():
    local = entries_of(1, 2) + entries_of(2, 2)
    ring, directory = ring_of(0, 1), EntryDirectory()  # process 2 drains: not on the ring
    plan = plan_migration(2, local, ring, directory, keep_copies=False)
    assert sorted(k for t in plan.transfers for k in t.keys) == sorted(e.key for e in local)
    assert plan.drops == []
    for t in plan.transfers:  # the owners report the chunks in their directories
        for k in t.keys:
            directory.add(k, 1000, [t.target])
    plan = plan_migration(2, local, ring, directory, keep_copies=False)
    assert plan.transfers == [] and sorted(plan.drops) == sorted(e.key for e in local)


def test_each_missing_replica_is_sent_once_by_the_first_owner_that_holds_it():
    ring, directory = ring_of(0, 1, 2), EntryDirectory()
    local = entries_of(4, 2)
    owners = ring.get_nodes(local[0].key, 2)
    holders = [owners[0], 3 if owners[1] != 3 else 4]  # the primary and a non-owner hold the chain
    for e in local:
        directory.add(e.key, e.nbytes, holders)
    by_primary = plan_migration(owners[0], local, ring, directory, replication_factor=2)
    by_other = plan_migration(holders[1], local, ring, directory, replication_factor=2)
    assert [t.target for t in by_primary.transfers] == [owners[1]]
    assert by_other.transfers == []


def test_already_sent_chunks_are_skipped_until_they_show_up():
    ring, directory = ring_of(1), EntryDirectory()
    local = entries_of(6, 3)
    skip = {(local[0].key, 1)}
    plan = plan_migration(0, local, ring, directory, skip=skip)
    assert [k for t in plan.transfers for k in t.keys] == [e.key for e in local[1:]]


def test_steps_respect_the_byte_bound_and_keep_order_per_target():
    sizes = {key(i): 400 for i in range(10)}
    transfers = [Transfer(1, tuple(key(i) for i in range(5)), 2000), Transfer(2, (key(5),), 400),
                 Transfer(1, tuple(key(i) for i in range(6, 10)), 1600)]
    steps = split_into_steps(transfers, sizes, 1000)
    assert all(s.nbytes <= 1000 for s in steps)
    assert [k for s in steps if s.target == 1 for k in s.keys] == [key(i) for i in (0, 1, 2, 3, 4, 6, 7, 8, 9)]
    assert split_into_steps([Transfer(1, (key(0),), 400)], sizes, 100)[0].keys == (key(0),)  # one big entry alone
    with pytest.raises(ValueError, match="`max_bytes_per_step`"):
        split_into_steps(transfers, sizes, 0)


# ---------------------------------------------------------------------- eviction
def test_shares_are_proportional_capped_and_sum_to_the_target():
    shares = eviction_shares(3000, {0: 4000, 1: 2000, 2: 0})
    assert shares == {0: 2000, 1: 1000, 2: 0}
    capped = eviction_shares(5000, {0: 1000, 1: 9000})
    assert capped[0] <= 1000 and sum(capped.values()) == 5000
    assert eviction_shares(10**9, {0: 10, 1: 20}) == {0: 10, 1: 20}
    assert sum(eviction_shares(7, {0: 3, 1: 3, 2: 3}).values()) == 7
    with pytest.raises(ValueError, match="`target_bytes`"):
        eviction_shares(-1, {0: 1})


def test_local_eviction_takes_unowned_replicas_then_replicas_then_the_coldest_sole_copies():
    sole_cold = entries_of(1, 1, tick=0)
    sole_warm = entries_of(2, 1, tick=50)
    replica_warm = entries_of(3, 1, tick=90)
    copy_hot = entries_of(4, 1, tick=99)
    infos = sole_cold + sole_warm + replica_warm + copy_hot
    replicated = {replica_warm[0].key, copy_hot[0].key}
    owned = {e.key for e in sole_cold + sole_warm + replica_warm}
    assert plan_local_eviction(infos, 1000, replicated, owned) == [copy_hot[0].key]
    assert plan_local_eviction(infos, 2000, replicated, owned) == [copy_hot[0].key, replica_warm[0].key]
    assert plan_local_eviction(infos, 3000, replicated, owned)[-1] == sole_cold[0].key


def test_local_eviction_counts_what_extends_a_chunk_and_spares_pinned_chains():
    chain = entries_of(5, 3, tick=0)
    pinned_leaf = [EntryInfo(chain[2].key, chain[1].key, 1000, 2, pinned=True)]
    other = entries_of(6, 1, tick=5)
    # the root is coldest: removing it frees the whole chain of 3000 bytes
    assert plan_local_eviction(chain + other, 2500, set()) == [chain[0].key]
    # with the leaf pinned, nothing of that chain may go
    assert plan_local_eviction(chain[:2] + pinned_leaf + other, 2500, set()) == [other[0].key]


# ---------------------------------------------------------------------- directory
def test_directory_replaces_a_nodes_key_set_and_tracks_holders():
    directory = EntryDirectory()
    directory.add(key(1), 10, [0, 1])
    directory.replace_node(1, {key(2): 20})
    assert directory.holders(key(1)) == {0} and directory.holders(key(2)) == {1}
    assert directory.bytes_of(1) == 20
    directory.drop_node(0)
    assert key(1) not in directory and len(directory) == 1
    with pytest.raises(ValueError, match="`size_bytes`"):
        directory.add(key(3), -1, [0])
