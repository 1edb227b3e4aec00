"""The tier's sizer in vLLM's worker under simulated memory pressure (INT8)."""

from __future__ import annotations

import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import pytest
from vllm.distributed.kv_transfer import get_kv_transfer_group

from hf_kvcache_plugin.reuse.memory import MemoryReading
from hf_kvcache_plugin.reuse.prefix_store import chunk_keys

from .conftest import BLOCK, MATCHABLE, NEW_TOKENS, PROMPTS, close_llm, generate, kv_transfer, make_llm, service_of
from .test_connector import chunk_nbytes

MIB = 2**20


class Memory:
    """The sizer's memory reader, set by the test: the used fraction it reports."""

    def __init__(self, used_fraction: float):
        self.used_fraction = used_fraction

    def __call__(self) -> MemoryReading:
        return MemoryReading.at_fraction(self.used_fraction)


@pytest.fixture(scope="module")
def sized_llm(model_dir, reference):
    budget_mb = 4 * chunk_nbytes(8) / MIB  # two prompts' chains
    sizer = {
        "min_size_mb": 0.0, "max_size_mb": budget_mb, "interval_s": 0.001, "cooldown_s": 3600.0,  # one shrink
        "trend_horizon_s": 0.0, "background": False,  # stepped by the worker at every step
    }  # fmt: skip
    llm = make_llm(model_dir, kv_transfer("int8", budget_mb, sizer=sizer))
    memory = Memory(0.1)
    service_of(llm).sizer.monitor.reader = memory
    yield llm, memory
    close_llm(llm)


def test_memory_pressure_shrinks_the_tier_lru_first_and_output_stays_vllms(sized_llm, reference):
    llm, memory = sized_llm
    service = service_of(llm)
    store, sizer = service.store, service.sizer
    chunk = chunk_nbytes(8)
    store.clear()
    memory.used_fraction = 0.1  # low: the budget holds (at its maximum)
    for prompt in PROMPTS[:2]:  # prompt 0's chain is the older one
        generate(llm, [prompt], NEW_TOKENS)
    assert (store.max_bytes, store.used_bytes, len(store)) == (4 * chunk, 4 * chunk, 4)
    evicted = store.stats()["evicted_bytes"]

    memory.used_fraction = 0.9  # high: the worker's next step halves the budget
    ((tokens, cached),) = generate(llm, PROMPTS[1:2], NEW_TOKENS)
    assert cached == MATCHABLE and tokens == reference[1][0]
    assert [d.action for d in sizer.decisions if d.action != "hold"] == ["shrink"]  # then the cooldown holds
    assert (store.max_bytes, store.used_bytes, len(store)) == (2 * chunk, 2 * chunk, 2)
    assert store.stats()["evicted_bytes"] - evicted == 2 * chunk
    namespace = get_kv_transfer_group().namespace  # the worker side's connector (engine in this process)
    assert all(key in store for key in chunk_keys(namespace, PROMPTS[1][:MATCHABLE], BLOCK))  # the recent chain stays
    assert not any(key in store for key in chunk_keys(namespace, PROMPTS[0][:MATCHABLE], BLOCK))

    memory.used_fraction = 0.75  # moderate: hold
    served = generate(llm, PROMPTS[:2], NEW_TOKENS)
    assert [c for _, c in served] == [0, MATCHABLE]  # the evicted chain is computed again, the other loaded
    assert [t for t, _ in served] == [reference[0][0], reference[1][0]]
    stats = service.tier_stats()
    assert (stats["sizer"]["current_size_mb"], stats["sizer"]["resizes"]) == (2 * chunk / MIB, 1)
    assert stats["sizer"]["pressure"] == "moderate"
    assert (stats["sizer"]["hits"], stats["sizer"]["misses"]) == (2, 3)
    assert stats["requests"] == {"requests": 5, "tier_hits": 2, "tier_tokens": 2 * MATCHABLE}
    assert store.accounting_problems() == []
