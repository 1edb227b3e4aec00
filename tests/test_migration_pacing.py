"""Migration batches sized by measured bandwidth: the pacer's plan, its estimates, and an ``EntryExchange``
sending through a fake store transport whose clock moves at each target's speed."""

from __future__ import annotations

import hashlib
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from hf_kvcache_plugin import DistributedConfig, create_distributed_cache_optimizer, parse_config
from hf_kvcache_plugin.distributed import ConsistentHashRing, EntryDirectory, EntryInfo, NodeState
from hf_kvcache_plugin.distributed.entry_exchange import EntryExchange
from hf_kvcache_plugin.distributed.migration_pacing import MigrationPacer
from hf_kvcache_plugin.distributed.payloads import decode_entries
from hf_kvcache_plugin.resilience.metrics import ServingMetrics

MIB = 2**20
KIB = 2**10


def key(i: int) -> bytes:
    return hashlib.blake2b(str(i).encode(), digest_size=32).digest()


# ---------------------------------------------------------------------- the plan
def test_an_unmeasured_peer_gets_what_the_seed_bandwidth_moves_in_the_time_budget():
    pacer = MigrationPacer(time_budget_s=0.1, max_bytes_per_step=64 * MIB, initial_mb_per_s=2.0)
    keys = [key(i) for i in range(20)]
    sizes = dict.fromkeys(keys, 50 * KIB)
    (step,) = pacer.plan_step({1: keys}, sizes)
    # 2 MiB/s for 0.1 s is 209.7 KiB: four entries of 50 KiB, a fifth would exceed it
    assert step.keys == tuple(keys[:4]) and step.nbytes == 200 * KIB


def test_a_slow_peer_gets_a_smaller_batch_than_a_fast_one_and_the_step_keeps_its_time_budget():
    pacer = MigrationPacer(time_budget_s=0.2, max_bytes_per_step=64 * MIB, initial_mb_per_s=1.0)
    pacer.record(1, 10 * MIB, 10, seconds=1.0)  # 10 MiB/s
    pacer.record(2, 1 * MIB, 10, seconds=1.0)  # 1 MiB/s
    keys = {t: [key(100 * t + i) for i in range(200)] for t in (1, 2)}
    sizes = {k: 16 * KIB for ks in keys.values() for k in ks}
    for turn in (0, 1):  # either peer first
        steps = {s.target: s for s in pacer.plan_step(keys, sizes, turn=turn)}
        assert steps[2].nbytes < steps[1].nbytes
        seconds = sum(s.nbytes / pacer.bytes_per_s(s.target) for s in steps.values())
        assert seconds <= 0.2
        for target, step in steps.items():
            assert step.keys == tuple(keys[target][: len(step.keys)])  # a prefix: parents stay first
    # alone, each gets what its bandwidth moves in the whole budget
    (fast,) = pacer.plan_step({1: keys[1]}, sizes)
    (slow,) = pacer.plan_step({2: keys[2]}, sizes)
    assert fast.nbytes == (2 * MIB // (16 * KIB)) * 16 * KIB  # 10 MiB/s * 0.2 s = 2 MiB
    assert slow.nbytes == (MIB // 5 // (16 * KIB)) * 16 * KIB  # 1 MiB/s * 0.2 s = 204.8 KiB -> 12 entries


def test_the_byte_cap_holds_over_all_peers_of_a_step():
    pacer = MigrationPacer(time_budget_s=10.0, max_bytes_per_step=100 * KIB, initial_mb_per_s=1000.0)
    keys = {t: [key(100 * t + i) for i in range(50)] for t in (1, 2, 3)}
    sizes = {k: 10 * KIB for ks in keys.values() for k in ks}
    steps = pacer.plan_step(keys, sizes)
    assert sum(s.nbytes for s in steps) == 100 * KIB
    assert [s.target for s in steps] == [1]  # the first peer filled the cap


def test_an_entry_larger_than_the_budget_moves_alone_and_first_peers_take_turns():
    pacer = MigrationPacer(time_budget_s=0.1, max_bytes_per_step=MIB, initial_mb_per_s=1.0)
    big, small = key(0), key(1)
    sizes = {big: 8 * MIB, small: KIB}
    (step,) = pacer.plan_step({1: [big, small], 2: [key(2)]}, {**sizes, key(2): KIB})
    assert step.target == 1 and step.keys == (big,) and step.nbytes == 8 * MIB  # over both budgets, alone
    # the next round the other peer goes first: it is not starved by the big one
    steps = pacer.plan_step({1: [big, small], 2: [key(2)]}, {**sizes, key(2): KIB}, turn=1)
    assert [s.target for s in steps] == [2]
    assert pacer.plan_step({}, {}) == []


def test_the_estimate_is_an_ema_of_measured_bandwidth_exported_as_metrics():
    metrics = ServingMetrics()
    pacer = MigrationPacer(time_budget_s=0.1, max_bytes_per_step=MIB, initial_mb_per_s=4.0, metrics=metrics, rank=0)
    assert pacer.bytes_per_s(1) == 4.0 * MIB  # the seed until measured
    pacer.record(1, 2 * MIB, 3, seconds=1.0)
    assert pacer.peers[1].mb_per_s == 2.0  # the first measurement replaces the seed
    pacer.record(1, 12 * MIB, 5, seconds=1.0)
    assert pacer.peers[1].mb_per_s == pytest.approx(0.7 * 2.0 + 0.3 * 12.0)
    pacer.record(1, KIB, 1, seconds=0.0)  # a clock that did not move says nothing of the bandwidth
    link = pacer.stats()["peers"][1]
    assert link["mb_per_s"] == pytest.approx(5.0) and link["measured_batches"] == 2
    assert (link["last_batch_bytes"], link["last_batch_entries"], link["largest_batch_bytes"]) == (KIB, 1, 12 * MIB)
    assert link["bytes_sent"] == 14 * MIB + KIB
    assert metrics.value("hf_kvcache_migration_bandwidth_mb_per_s", rank="0", peer="1") == pytest.approx(5.0)
    assert metrics.value("hf_kvcache_migration_batch_bytes_count", rank="0", peer="1") == 3


@pytest.mark.parametrize("name", ["time_budget_s", "max_bytes_per_step", "initial_mb_per_s"])
def test_bad_pacer_settings_name_the_argument(name):
    settings = dict(time_budget_s=0.1, max_bytes_per_step=MIB, initial_mb_per_s=1.0)
    with pytest.raises(ValueError, match=f"`{name}` has to be a positive number but got 0"):
        MigrationPacer(**{**settings, name: 0})


# ---------------------------------------------------------------------- through EntryExchange
class FakeEntries:
    """Single-chunk chains of given sizes; payloads carry as many bytes."""

    def __init__(self, sizes: dict[bytes, int]):
        self.sizes = sizes

    def entry_infos(self) -> list[EntryInfo]:
        return [EntryInfo(k, None, n, i) for i, (k, n) in enumerate(self.sizes.items())]

    def export_entries(self, keys):
        return [{"key": k, "data": torch.zeros(self.sizes[k], dtype=torch.uint8)} for k in keys if k in self.sizes]

    def remove_entries(self, keys) -> int:
        return 0


class FakeTransport:
    """A store whose writes take ``len(payload) / speed[target]`` seconds on its clock."""

    def __init__(self, speeds: dict[int, float]):
        self.speeds, self.now, self.posted = speeds, 0.0, {}

    def clock(self) -> float:
        return self.now

    def key(self, *parts: object) -> str:
        return "/".join(map(str, parts))

    def post(self, key: str, payload: bytes) -> None:
        target = int(key.split("/")[2])
        self.now += len(payload) / self.speeds[target]
        self.posted[key] = payload

    def exists(self, key: str) -> bool:
        return key in self.posted


def test_exchange_sizes_batches_per_peer_from_measured_speed_and_loses_nothing():
    sizes = {key(i): (64 + 16 * (i % 3)) * KIB for i in range(60)}
    sizes[key(60)] = 3 * MIB  # larger than any step's budget
    ring = ConsistentHashRing(virtual_nodes=64, nodes={1: 1.0, 2: 1.0})
    owner = {k: ring.get_nodes(k, 1)[0] for k in sizes}
    assert {1, 2} == set(owner.values())
    cluster = SimpleNamespace(node_id=0, ring=ring, replication_factor=1, node=SimpleNamespace(state=NodeState.ACTIVE),
                              reachable=lambda target: True, announced=True)
    transport = FakeTransport({1: 40.0 * MIB, 2: 2.0 * MIB})  # bytes per second
    directory = EntryDirectory()
    pacer = MigrationPacer(time_budget_s=0.25, max_bytes_per_step=4 * MIB, initial_mb_per_s=1.0)
    exchange = EntryExchange(cluster, FakeEntries(sizes), directory, transport, Counter(), pacer)
    received: dict[int, list[bytes]] = {1: [], 2: []}
    batches: dict[int, list[int]] = {1: [], 2: []}
    for round_no in range(200):
        before = transport.now
        exchange.migration_step(round_no)
        step_keys = []
        for name, data in list(transport.posted.items()):  # each target reads its batch and deletes it
            target = int(name.split("/")[2])
            entries = decode_entries(data)
            received[target].extend(e["key"] for e in entries)
            batches[target].append(sum(sizes[e["key"]] for e in entries))
            step_keys.extend(e["key"] for e in entries)
            for e in entries:
                directory.add(e["key"], sizes[e["key"]], [target])
            del transport.posted[name]
        step_bytes = sum(sizes[k] for k in step_keys)
        assert step_bytes <= 4 * MIB or len(step_keys) == 1  # the cap, or one entry alone
        if key(60) not in step_keys and round_no > 2:
            # measured estimates: the step's time stays near its budget (the wire adds torch.save framing)
            assert transport.now - before <= 0.25 * 1.1
        if sum(map(len, received.values())) == len(sizes):
            break
    for target in (1, 2):  # every pending entry arrived once, at its owner
        assert sorted(received[target]) == sorted(k for k, t in owner.items() if t == target)
    big_target = owner[key(60)]
    assert any(b == 3 * MIB for b in batches[big_target])  # it moved, alone
    measured = pacer.stats()["peers"]
    assert measured[1]["mb_per_s"] == pytest.approx(40.0, rel=0.05)
    assert measured[2]["mb_per_s"] == pytest.approx(2.0, rel=0.05)
    typical = lambda t: sorted(b for b in batches[t] if b != 3 * MIB)[len(batches[t]) // 2]  # noqa: E731
    assert typical(2) < typical(1) / 4  # the slow peer's batches are much smaller


def test_coordinator_reports_migration_pacing_and_the_config_bounds_the_budget():
    config = DistributedConfig(migration_time_budget_ms=50.0, migration_initial_mb_per_s=8.0)
    stats = create_distributed_cache_optimizer("node-0", config=config).stats()["migration"]
    assert stats == {"time_budget_ms": 50.0, "max_bytes_per_step": 16 * MIB, "initial_mb_per_s": 8.0, "peers": {}}
    with pytest.raises(ValueError, match="`distributed.migration_time_budget_ms` has to be at most `round_deadline_s`"):
        parse_config({"prefix_store": {}, "distributed": {"round_deadline_s": 1.0, "migration_time_budget_ms": 2000}})
    with pytest.raises(ValueError, match="`distributed.migration_time_budget_ms`"):
        parse_config({"prefix_store": {}, "distributed": {"migration_time_budget_ms": 0}})
