"""ConsistentHashRing: balance, weights, replication, stability under joins and leaves, process independence."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from hf_kvcache_plugin.distributed import ConsistentHash, ConsistentHashRing, ring_position

RING_FILE = Path(__file__).resolve().parents[1] / "hf_kvcache_plugin" / "distributed" / "hash_ring.py"
KEYS = [hashlib.blake2b(str(i).encode(), digest_size=32).digest() for i in range(6000)]


def owners(ring: ConsistentHashRing, n: int = 1) -> dict[bytes, list[int]]:
    return {k: ring.get_nodes(k, n) for k in KEYS}


@pytest.mark.parametrize("num_nodes", [2, 4, 8])
def test_keys_spread_evenly_over_equal_nodes(num_nodes):
    ring = ConsistentHashRing(virtual_nodes=128, nodes=dict.fromkeys(range(num_nodes), 1.0))
    counts = Counter(ring.get_node(k) for k in KEYS)
    mean = len(KEYS) / num_nodes
    assert set(counts) == set(range(num_nodes))
    # 128 points per node: every node within 25% of the mean
    assert max(abs(c - mean) / mean for c in counts.values()) < 0.25, counts


def test_capacity_weights_give_proportional_shares():
    ring = ConsistentHashRing(virtual_nodes=128, nodes={0: 1.0, 1: 1.0, 2: 2.0})
    counts = Counter(ring.get_node(k) for k in KEYS)
    assert 1.6 < counts[2] / ((counts[0] + counts[1]) / 2) < 2.4, counts


@pytest.mark.parametrize("n", [1, 2, 3])
def test_get_nodes_returns_n_distinct_owners_primary_first(n):
    ring = ConsistentHashRing(virtual_nodes=64, nodes=dict.fromkeys(range(5), 1.0))
    for key in KEYS[:500]:
        nodes = ring.get_nodes(key, n)
        assert len(nodes) == n == len(set(nodes))
        assert nodes[0] == ring.get_node(key)
        assert ring.get_nodes(key, n + 1)[:n] == nodes  # replicas extend the same preference list


def test_get_nodes_caps_at_ring_size_and_empty_ring_is_an_error():
    ring = ConsistentHashRing(nodes={0: 1.0, 1: 1.0})
    assert sorted(ring.get_nodes(KEYS[0], 5)) == [0, 1]
    with pytest.raises(ValueError, match="no nodes"):
        ConsistentHashRing().get_node(KEYS[0])
    with pytest.raises(ValueError, match="`n` has to be a positive integer"):
        ring.get_nodes(KEYS[0], 0)


@pytest.mark.parametrize("num_nodes", [3, 5, 8])
def test_adding_a_node_moves_about_one_nth_of_keys_all_to_it(num_nodes):
    ring = ConsistentHashRing(virtual_nodes=128, nodes=dict.fromkeys(range(num_nodes), 1.0))
    before = owners(ring)
    ring.add_node(num_nodes, 1.0)
    after = owners(ring)
    moved = [k for k in KEYS if before[k] != after[k]]
    ideal = 1 / (num_nodes + 1)
    assert abs(len(moved) / len(KEYS) - ideal) < 0.35 * ideal, (len(moved) / len(KEYS), ideal)
    assert all(after[k] == [num_nodes] for k in moved)  # nothing moves between the old nodes


@pytest.mark.parametrize("num_nodes", [3, 5, 8])
def test_removing_a_node_moves_only_its_keys(num_nodes):
    ring = ConsistentHashRing(virtual_nodes=128, nodes=dict.fromkeys(range(num_nodes), 1.0))
    before = owners(ring)
    ring.remove_node(1)
    after = owners(ring)
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == [1]}
    ideal = 1 / num_nodes
    assert abs(len(moved) / len(KEYS) - ideal) < 0.35 * ideal


def test_replica_sets_change_by_about_r_over_n_on_join():
    ring = ConsistentHashRing(virtual_nodes=128, nodes=dict.fromkeys(range(5), 1.0))
    before = owners(ring, 2)
    ring.add_node(5, 1.0)
    after = owners(ring, 2)
    gained = sum(5 in after[k] for k in KEYS) / len(KEYS)
    assert abs(gained - 2 / 6) < 0.1
    # a key's replica set loses at most the one node the newcomer displaced
    assert all(len(set(before[k]) - set(after[k])) <= 1 for k in KEYS)


def test_membership_errors_name_the_node():
    ring = ConsistentHashRing(nodes={0: 1.0})
    with pytest.raises(ValueError, match="node 0 is already on the ring"):
        ring.add_node(0)
    with pytest.raises(ValueError, match="node 3 is not on the ring"):
        ring.remove_node(3)
    with pytest.raises(ValueError, match="`weight` of node 1"):
        ring.add_node(1, 0)
    with pytest.raises(ValueError, match="`virtual_nodes`"):
        ConsistentHashRing(virtual_nodes=0)


def test_ring_order_does_not_depend_on_insertion_order():
    a = ConsistentHashRing(nodes={0: 1.0, 1: 1.0, 2: 1.0})
    b = ConsistentHashRing(nodes={2: 1.0, 0: 1.0, 1: 1.0})
    assert owners(a, 2) == owners(b, 2)


def test_positions_are_the_same_in_a_process_with_another_hash_seed():
    """Content hashes, not Python's hash(): a fresh interpreter with another PYTHONHASHSEED agrees."""
    ring = ConsistentHashRing(nodes={0: 1.0, 1: 1.0, 2: 1.0})
    # load the one file: importing the package would pull in transformers, which has nothing to do with this
    code = (
        "import importlib.util as u;"
        f"spec = u.spec_from_file_location('hash_ring', {str(RING_FILE)!r});"
        "m = u.module_from_spec(spec); spec.loader.exec_module(m);"
        "ConsistentHashRing, ring_position = m.ConsistentHashRing, m.ring_position;"
        "r = ConsistentHashRing(nodes={0: 1.0, 1: 1.0, 2: 1.0});"
        "print(ring_position(b'abc'), [r.get_node(bytes([i])) for i in range(50)])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == f"{ring_position(b'abc')} {[ring.get_node(bytes([i])) for i in range(50)]}"


def test_node_names_are_ids_too_and_a_rank_is_not_its_name():
    ring = ConsistentHashRing(nodes={"node-0": 1.0, "node-1": 1.0, 2: 1.0, "2": 1.0})
    assert ring.nodes == [2, "2", "node-0", "node-1"]  # ranks first, then names
    counts = Counter(ring.get_node(k) for k in KEYS)
    assert set(counts) == {2, "2", "node-0", "node-1"}
    assert all(abs(c / len(KEYS) - 0.25) < 0.06 for c in counts.values())
    before = owners(ring)
    ring.remove_node("2")
    assert all(before[k] == ring.get_nodes(k) for k in KEYS if before[k] != ["2"])
    assert ConsistentHash is ConsistentHashRing


@pytest.mark.parametrize("bad", [-1, "", None, 1.5, True, b"node"])
def test_a_node_id_is_a_rank_or_a_name(bad):
    with pytest.raises(ValueError, match=rf"`node_id` has to be a process rank .* or a node name .* but got {bad!r}"):
        ConsistentHashRing().add_node(bad)
