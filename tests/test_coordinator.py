"""The coordinator in one process: the no-launch path, the seed-compatible API, global eviction, the
prefix-store adapter, the transport's failure detection and breakers, the config section."""

from __future__ import annotations

import datetime
import itertools
import logging
import time
from pathlib import Path

import pybreaker
import pytest
import torch
import torch.distributed as dist

from hf_kvcache_plugin import (
    BreakerConfig,
    CacheConfig,
    DistributedConfig,
    NodeInfo,
    NodeState,
    PrefixEntry,
    PrefixStore,
    PrefixStoreAdapter,
    attach_prefix_cache,
    chunk_keys,
    create_distributed_cache_optimizer,
    load_config,
    parse_config,
    quantize,
)
from hf_kvcache_plugin.distributed import attach_coordinator, generate_new_tokens
from hf_kvcache_plugin.distributed.payloads import decode_entries, encode_entries
from hf_kvcache_plugin.distributed.transport import PeerDead, PeerLeft, PeerOutOfStep, StoreTransport

REPO = Path(__file__).resolve().parents[1]
CHUNK = 16
MIB = 2**20


def synthetic_entry(key: bytes, parent: bytes | None, seed: int) -> PrefixEntry:
    g = torch.Generator().manual_seed(seed)
    blocks = lambda: quantize(torch.randn(1, 2, CHUNK // 8, 8, 8, generator=g), bits=4, group_size=8, axis=3)  # noqa: E731
    return PrefixEntry(key, parent, CHUNK, (blocks(), blocks()), (blocks(), blocks()))


def filled_store(prompts: int = 4, depth: int = 2, max_size_mb: float = 1.0) -> tuple[PrefixStore, list[list[bytes]]]:
    store, chains = PrefixStore(max_size_mb=max_size_mb, chunk_size=CHUNK), []
    for p in range(prompts):
        keys = chunk_keys(b"ns", [p] * (CHUNK * depth), CHUNK)
        store.put_chain([synthetic_entry(k, keys[i - 1] if i else None, 10 * p + i) for i, k in enumerate(keys)])
        chains.append(keys)
    return store, chains


# ---------------------------------------------------------------------- one process
def test_without_a_distributed_launch_generate_serves_locally_with_the_same_outputs(model, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cache_config = CacheConfig(quant_type="int8", group_size=8, residual_length=16)
    prompts = [[5 + (i * 7 + j) % 90 for j in range(40 + i)] for i in range(3)]
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    plain = generate_new_tokens(model, prompts, 0, **kwargs)
    hook = attach_prefix_cache(model, PrefixStore(max_size_mb=4, chunk_size=CHUNK), cache_config)
    try:
        coordinator = attach_coordinator(hook, DistributedConfig(), generate_kwargs=kwargs)
        assert coordinator.transport is None and coordinator.ring.nodes == [0]
        assert coordinator.generate(prompts) == plain
        assert coordinator.generate(prompts) == plain  # second time from stored chunks
        assert hook.stats()["hit_tokens"] > 0
        stats = coordinator.stats()
        assert stats["served_local"] == 6 and stats["directory_keys"] == len(hook.store)
        assert coordinator.get_placement(coordinator.prompt_keys(prompts[0])[0]) == [0]
        assert coordinator.drain() == len(hook.store)  # nobody to hand over to: entries stay
        assert coordinator.node.state == NodeState.OFFLINE
    finally:
        hook.detach()


# ---------------------------------------------------------------------- seed-compatible API
def test_seed_api_places_keys_on_registered_active_nodes_and_plans_global_eviction():
    coordinator = create_distributed_cache_optimizer(local_node_id=0, replication_factor=2)
    for node_id in range(1, 4):
        coordinator.register_node(NodeInfo(node_id, f"host{node_id}:0", capacity_mb=256))
    key = b"\x01" * 32
    placement = coordinator.get_placement(key)
    assert len(placement) == 2 == len(set(placement)) and set(placement) <= {0, 1, 2, 3}
    assert placement == coordinator.ring.get_nodes(key, 2)

    coordinator.register_node(NodeInfo(placement[0], state=NodeState.DRAINING))
    assert placement[0] not in coordinator.get_placement(key)

    coordinator.register_entry(key, 3 * MIB, [1, 2])
    coordinator.register_entry(b"\x02" * 32, 1 * MIB, [3])
    report = coordinator.trigger_global_eviction(2.0)
    assert report.target_bytes == 2 * MIB and sum(report.shares.values()) == 2 * MIB
    assert abs(report.shares[1] - report.shares[2]) <= 1 and report.shares[1] > report.shares[3]
    assert report.shares[0] == 0
    assert not report.announced and report.freed_local_bytes == 0

    with pytest.raises(ValueError, match=r"unregistered nodes \[9\]"):
        coordinator.register_entry(key, 1, [9])
    with pytest.raises(ValueError, match="`target_reduction_mb`"):
        coordinator.trigger_global_eviction(-1)
    with pytest.raises(ValueError, match="`capacity_mb` of node 5"):
        NodeInfo(5, capacity_mb=0)
    with pytest.raises(ValueError, match=r"`state` of node 5 has to be one of \['active', 'draining', 'offline'\]"):
        NodeInfo(5, state="gone")


def test_seed_api_takes_node_names_and_ports():
    coordinator = create_distributed_cache_optimizer(local_node_id="node-0", replication_factor=2, port=8000)
    coordinator.register_node(NodeInfo(node_id="node-1", address="192.168.1.10", port=8001, capacity_mb=4096))
    coordinator.register_node(NodeInfo(node_id=7, address="192.168.1.11", port=8002))  # a rank beside names
    assert coordinator.node.port == 8000 and coordinator.nodes["node-1"].port == 8001
    assert coordinator.ring.nodes == [7, "node-0", "node-1"]
    placement = coordinator.get_placement("user:123:kv")
    assert len(set(placement)) == 2 and set(placement) <= {7, "node-0", "node-1"}
    coordinator.register_entry("user:123:kv", size_bytes=10 * MIB, node_ids=placement)
    report = coordinator.trigger_global_eviction(target_reduction_mb=4)
    assert sum(report.shares.values()) == 4 * MIB and set(report.shares) == {7, "node-0", "node-1"}
    assert {n for n, share in report.shares.items() if share} == set(placement)
    with pytest.raises(ValueError, match=r"unregistered nodes \['node-9'\]; registered are \[7, 'node-0', 'node-1'\]"):
        coordinator.register_entry("k", 1, ["node-9"])
    restored = NodeInfo.from_json(coordinator.nodes["node-1"].to_json())
    assert restored == coordinator.nodes["node-1"]


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: NodeInfo(node_id=""), r"`node_id` has to be a process rank \(an integer >= 0\) or a node name"),
        (lambda: NodeInfo(node_id=-2), r"but got -2"),
        (lambda: NodeInfo("n", port=70000), r"`port` of node 'n' has to be an integer in \[1, 65535\] or None"),
        (lambda: NodeInfo("n", address=10), r"`address` of node 'n' has to be a string but got 10"),
    ],
)
def test_node_info_errors_name_the_field_and_the_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_with_a_transport_the_local_node_is_the_rank():
    class Transport:  # only its rank is read before the check
        rank = 1

    with pytest.raises(ValueError, match=r"this process's rank 1 but got 'node-0'"):
        create_distributed_cache_optimizer(local_node_id="node-0", transport=Transport())


def test_global_eviction_frees_the_local_share_replicas_first():
    store, chains = filled_store(prompts=4)
    adapter = PrefixStoreAdapter(store)
    coordinator = create_distributed_cache_optimizer(local_node_id=0, replication_factor=1, local_entries=adapter)
    coordinator.register_node(NodeInfo(1))
    for k in chains[2]:  # another process holds a copy of chain 2
        coordinator.register_entry(k, store.get(k).nbytes, [1])
    used = store.used_bytes
    entry_bytes = used // 8
    report = coordinator.trigger_global_eviction(2 * entry_bytes / MIB)
    assert report.shares[0] >= entry_bytes  # its share, in proportion to what it holds
    assert report.freed_local_bytes >= report.shares[0] and store.used_bytes == used - report.freed_local_bytes
    assert chains[2][0] not in store  # the replica went first
    assert all(k in store for k in chains[0] + chains[1] + chains[3])


# ---------------------------------------------------------------------- prefix store adapter
def test_entries_migrate_as_the_same_quantized_bytes_and_chains_stay_usable():
    source, chains = filled_store(prompts=2, depth=3)
    target = PrefixStore(max_size_mb=1.0, chunk_size=CHUNK)
    keys = [k for chain in chains for k in chain]
    wire = encode_entries(PrefixStoreAdapter(source).export_entries(keys))
    assert PrefixStoreAdapter(target).import_entries(decode_entries(wire)) == len(keys)
    assert target.used_bytes == source.used_bytes
    for k in keys:
        for a, b in zip(source.get(k).keys + source.get(k).values, target.get(k).keys + target.get(k).values):
            assert (a.bits, a.group_size, a.axis, a.shape, a.dtype) == (b.bits, b.group_size, b.axis, b.shape, b.dtype)
            assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    match = target.lookup(b"ns", [1] * (CHUNK * 3))
    assert match.num_tokens == 3 * CHUNK


def test_adapter_lists_recency_and_removal_spares_pinned_chains():
    store, chains = filled_store(prompts=2, depth=2)
    adapter = PrefixStoreAdapter(store)
    infos = {i.key: i for i in adapter.entry_infos()}
    assert set(infos) == {k for c in chains for k in c}
    assert infos[chains[0][1]].parent == chains[0][0]
    assert infos[chains[1][0]].last_used > infos[chains[0][0]].last_used
    store.pin([chains[0][1]])
    assert adapter.remove_entries([chains[0][0]]) == 0  # a pinned chunk extends it
    freed = adapter.remove_entries([chains[1][0]])
    assert freed == sum(infos[k].nbytes for k in chains[1]) and chains[1][1] not in store


# ---------------------------------------------------------------------- transport
class StepClock:
    """Monotonic time that moves ``step`` seconds per reading: waits end after a fixed number of polls."""

    def __init__(self, step: float):
        self.ticks = itertools.count()
        self.step = step

    def __call__(self) -> float:
        return next(self.ticks) * self.step


@pytest.fixture
def store_pair():
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=5))
    clients = [dist.TCPStore("127.0.0.1", master.port, is_master=False, timeout=datetime.timedelta(seconds=5))
               for _ in range(2)]
    yield clients
    del clients, master


def transports(clients, **kwargs) -> list[StoreTransport]:
    settings = dict(namespace="t", heartbeat_interval_s=0.05, heartbeat_timeout_s=0.5,
                    breaker=BreakerConfig(fail_max=2, reset_timeout_s=30.0), clock=StepClock(0.06))
    return [StoreTransport(c, rank, 2, **{**settings, **kwargs}) for rank, c in enumerate(clients)]


def test_a_posted_message_is_received_and_consumed(store_pair):
    a, b = transports(store_pair)
    a.post(a.key("m"), b"hello")
    assert b.receive(0, b.key("m"), timeout_s=1.0) == b"hello"
    assert b.read(b.key("m")) is None


def test_a_silent_peer_is_declared_dead_and_its_breaker_opens(store_pair, caplog):
    _, b = transports(store_pair)
    caplog.set_level(logging.WARNING, logger="hf_kvcache_plugin.resilience.breakers")
    with pytest.raises(PeerDead, match="no heartbeat"):
        b.receive(0, b.key("never"), timeout_s=100.0)
    assert b.breaker_state(0) == pybreaker.STATE_CLOSED
    with pytest.raises(PeerDead):  # the second failure trips it (and is re-raised as itself)
        b.receive(0, b.key("never"), timeout_s=100.0)
    assert b.breaker_state(0) == pybreaker.STATE_OPEN and not b.may_call(0)
    with pytest.raises(pybreaker.CircuitBreakerError):  # open: refused without waiting
        b.receive(0, b.key("never"), timeout_s=100.0)
    assert b.events.transitions[("rank1->peer0", "open")] == 1
    assert "circuit breaker 'rank1->peer0' opened (closed -> open, last error: PeerDead" in caplog.text
    assert b.counters["dead_peer_detections"] == 2
    b.clock.ticks = itertools.count(10**6)  # past the reset timeout: the next call is the trial
    assert b.may_call(0)


def test_leaving_and_being_out_of_step_are_not_failures(store_pair):
    # a real heartbeat thread: real time (out of step needs one beat during the wait, ~0.05 s)
    a, b = transports(store_pair, clock=time.monotonic)
    a.start_heartbeat()
    try:
        for _ in range(3):
            with pytest.raises(PeerLeft):
                b.receive(0, b.key("x"), timeout_s=100.0, peer_left=lambda peer: True)
        with pytest.raises(PeerOutOfStep, match="round 1, this message is for round 9"):
            b.receive(0, b.key("x"), timeout_s=100.0, round_no=9, peer_round=lambda peer: 1)
        assert b.breaker_state(0) == pybreaker.STATE_CLOSED and b.events.failures["rank1->peer0"] == 0
    finally:
        a.stop_heartbeat()


# ---------------------------------------------------------------------- config
def test_distributed_config_section_loads_and_bad_values_name_the_key():
    config = load_config(REPO / "configs" / "distributed.yaml")
    assert config.distributed is not None and config.prefix_store is not None
    with pytest.raises(ValueError, match="unknown key"):
        parse_config({"prefix_store": {}, "distributed": {"replicas": 2}})
    with pytest.raises(ValueError, match="`distributed.replication_factor` has to be a positive integer but got 0"):
        parse_config({"prefix_store": {}, "distributed": {"replication_factor": 0}})
    with pytest.raises(ValueError, match="`distributed.heartbeat_timeout_s` has to exceed twice `heartbeat_interval_s`"):
        parse_config({"prefix_store": {}, "distributed": {"heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 1.5}})
    with pytest.raises(ValueError, match="`distributed.breaker.success_threshold` has to be a positive integer but got 0"):
        parse_config({"prefix_store": {}, "distributed": {"breaker": {"success_threshold": 0}}})
    with pytest.raises(ValueError, match=r"`distributed.breaker.reset_timeout_s` has to be in \(0, 86400.0\] but got 0"):
        parse_config({"prefix_store": {}, "distributed": {"breaker": {"reset_timeout_s": 0}}})
    with pytest.raises(ValueError, match="`distributed.breaker_reset_s` moved to `distributed.breaker.reset_timeout_s`"):
        parse_config({"prefix_store": {}, "distributed": {"breaker_reset_s": 0}})
    with pytest.raises(ValueError, match=r"`distributed.store_port` has to be in \[1, 65535\] or null but got 70000"):
        parse_config({"prefix_store": {}, "distributed": {"store_port": 70000}})
    with pytest.raises(ValueError, match="needs a `prefix_store` section"):
        parse_config({"distributed": {}})
