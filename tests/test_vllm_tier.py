"""The vLLM tier's parts that run without vLLM: its settings, the sizer resizing it, instances sharing it.

The connector itself (inside vLLM) is tested in tests_vllm/, in vLLM's own venv.
"""

from __future__ import annotations

import multiprocessing
import socket
import time

import pytest
import torch

from hf_kvcache_plugin.integrations.vllm_blocks import ChunkCodec
from hf_kvcache_plugin.integrations.vllm_store import StoreService, connect_store
from hf_kvcache_plugin.reuse.memory import MemoryReading

from .vllm_tier_peer import AUTHKEY, BLOCK, HEAD_SIZE, HEADS, LAYERS, NAMESPACE, chain, run_instance, settings

MIB = 2**20


def test_sizer_and_distributed_sections_are_taken():
    tier = settings(
        sizer={"min_size_mb": 1.0, "background": False},
        distributed={"store_port": 29555, "replication_factor": 3},
        instance_rank=1,
        instances=3,
    )
    assert (tier.sizer.min_size_mb, tier.sizer.background) == (1.0, False)
    assert (tier.distributed.store_port, tier.distributed.replication_factor) == (29555, 3)
    assert (tier.instance_rank, tier.instances) == (1, 3)


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"distributed": {}, "instance_rank": 0, "instances": 2}, r"`distributed.store_port` has to be set"),
        ({"distributed": {"store_port": 29555}}, r"needs kv_connector_extra_config \['instance_rank', 'instances'\]"),
        ({"distributed": {"store_port": 29555}, "instance_rank": 2, "instances": 2}, r"below `instances` \(2\) but got 2"),
        ({"distributed": {"store_port": 29555}, "instance_rank": -1, "instances": 2}, r"`instance_rank` has to be an integer >= 0"),
        ({"instance_rank": 0}, r"\['instance_rank'\] apply only with a `distributed:` section"),
        ({"full_precision": True, "distributed": {"store_port": 29555}, "instance_rank": 0, "instances": 2},
         r"the full-precision tier cannot join it"),
    ],
)
def test_bad_cluster_settings_are_refused_by_name(extra, message):
    with pytest.raises(ValueError, match=message):
        settings(**extra)


class Memory:
    def __init__(self, used_fraction: float):
        self.used_fraction = used_fraction

    def __call__(self) -> MemoryReading:
        return MemoryReading.at_fraction(self.used_fraction)


def test_memory_pressure_shrinks_the_tier_lru_first_with_exact_bytes():
    codec = ChunkCodec(settings().cache, LAYERS)
    old, new = chain(codec, list(range(300)), seed=1), chain(codec, list(range(1000, 1300)), seed=2)
    chunk = old[0].nbytes
    tier = settings(
        prefix_store={"max_size_mb": 4 * chunk / MIB},
        sizer={"min_size_mb": 0.0, "max_size_mb": 4 * chunk / MIB, "cooldown_s": 0.0, "trend_horizon_s": 0.0,
               "interval_s": 3600.0, "background": False},
    )  # fmt: skip
    service = StoreService.build(tier)
    memory = Memory(0.1)
    service.sizer.monitor.reader = memory
    store = service.store
    store.put_chain(old)
    store.put_chain(new)
    assert store.used_bytes == 4 * chunk
    service.step_sizer_if_due()  # low pressure, no requests: holds
    assert store.max_bytes == 4 * chunk

    memory.used_fraction = 0.9
    service.sizer.step()
    assert (store.max_bytes, store.used_bytes, store.stats()["evicted_bytes"]) == (2 * chunk, 2 * chunk, 2 * chunk)
    assert all(e.key in store for e in new) and not any(e.key in store for e in old)

    service.record_request(256, 12.5)
    service.record_request(0, 40.0)
    stats = service.tier_stats()
    assert stats["sizer"]["last_action"] == "shrink" and stats["sizer"]["pressure"] == "high"
    assert stats["sizer"]["current_size_mb"] == 2 * chunk / MIB
    assert (stats["sizer"]["hits"], stats["sizer"]["misses"], stats["sizer"]["mean_hit_ms"]) == (1, 1, 12.5)
    assert stats["requests"] == {"requests": 2, "tier_hits": 1, "tier_tokens": 256}
    assert stats["store"]["max_bytes"] == 2 * chunk and stats["cluster"] is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_chain_stored_by_one_instance_is_a_hit_of_another(tmp_path):
    """Two instances' tiers sharing through the coordinator, instance 0 here and instance 1 in a process of its
    own: the chain instance 0 stores reaches instance 1, whose scheduler-side lookup (over its socket) then
    matches it."""
    distributed = {
        "store_port": free_port(), "replication_factor": 2, "heartbeat_interval_s": 0.1,
        "heartbeat_timeout_s": 5.0, "round_deadline_s": 10.0,
    }  # fmt: skip
    prompt = list(range(3, 303))  # two whole chunks and a tail
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    address = str(tmp_path / "instance1.sock")
    other = context.Process(
        target=run_instance, args=({"distributed": distributed, "instance_rank": 1, "instances": 2}, address, stop),
        daemon=True,
    )
    other.start()
    tier = settings(distributed=distributed, instance_rank=0, instances=2)
    codec = ChunkCodec(tier.cache, LAYERS)
    here = StoreService.build(tier, entry_check=codec.entry_layout(HEADS, BLOCK, HEAD_SIZE, torch.float32).problem)
    try:
        here.store.put_chain(chain(codec, prompt))
        remote = connect_store(address, AUTHKEY, timeout_s=120)
        deadline = time.monotonic() + 120
        while remote.tier_stats()["cluster"].get("migrated_in_entries", 0) < 2:
            assert other.is_alive()
            assert time.monotonic() < deadline, remote.tier_stats()["cluster"]
            time.sleep(0.1)
        assert remote.matched_tokens(NAMESPACE, prompt, len(prompt) - 1) == 2 * BLOCK
        assert remote.tier_stats()["cluster"]["error"] is None and remote.stats()["entries"] == 2
        # the sender keeps its copy: both instances hold the chain now
        assert here.stats()["entries"] == 2 and here.tier_stats()["cluster"]["migrated_out_entries"] == 2
    finally:
        stop.set()
        other.join(timeout=60)
        here.close()
