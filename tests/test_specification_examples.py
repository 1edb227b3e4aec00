"""The specification's usage examples run as written, and do what their text says.

Each ```python block of ``../shared/SPECIFICATION.md`` is read at test time,
``from cache import`` is read as ``from hf_kvcache_plugin import`` (the only
change the specification allows), and the block is executed verbatim in a
fresh namespace. Names a block uses without defining them (the tensors to
store, the store behind ``cache.get``, the user's own callbacks and systems)
are supplied by the case that runs it, each with the reason; every block must
be claimed by exactly one case, so a new example cannot go untested.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Callable

import pytest
import torch

from hf_kvcache_plugin import (
    CacheConfig,
    CheckResult,
    HealthStatus,
    NodeInfo,
    PrefixStore,
    ProductionCacheWrapper,
    QuantizedKVCache,
    attach_prefix_cache,
    create_quantized_kv_cache,
)
from hf_kvcache_plugin.quantization import sqnr_db
from hf_kvcache_plugin.resilience.health import consistency_check

from .conftest import SHARED

SPEC = SHARED / "SPECIFICATION.md"


def spec_blocks() -> list[str]:
    if not SPEC.is_file():
        return []
    return re.findall(r"^```python\n(.*?)^```", SPEC.read_text(), flags=re.S | re.M)


BLOCKS = spec_blocks()


class Example:
    """One block of the specification, run verbatim with ``from cache import`` read as ours."""

    def __init__(self, index: int, source: str):
        self.index = index
        self.source = source.replace("from cache import", "from hf_kvcache_plugin import")

    def run(self, **given) -> dict:
        namespace = dict(given)
        exec(compile(self.source, f"{SPEC.name} example {self.index}", "exec"), namespace)  # noqa: S102
        return namespace


CASES: dict[str, Callable] = {}


def case(marker: str):
    """The case that runs the block containing ``marker``."""

    def register(fn: Callable) -> Callable:
        CASES[marker] = fn
        return fn

    return register


@pytest.mark.skipif(not BLOCKS, reason=f"needs {SPEC} (absent in this clone)")
def test_every_example_is_claimed_by_exactly_one_case():
    claims = [[m for m in CASES if m in block] for block in BLOCKS]
    assert all(len(c) == 1 for c in claims), claims
    assert len({c[0] for c in claims}) == len(CASES) == len(BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"example{i}" for i in range(len(BLOCKS))])
def test_example_runs_as_written(index, request, capsys, monkeypatch):
    block = BLOCKS[index]
    (marker,) = [m for m in CASES if m in block]
    CASES[marker](Example(index, block), request=request, capsys=capsys, monkeypatch=monkeypatch)


# ---------------------------------------------------------------------- 1. KV cache compression
@case("cache.store(layer_id=0, k=k_tensor, v=v_tensor)")
def quantized_cache(example: Example, capsys, **_):
    # k_tensor / v_tensor are the caller's K/V for the cache the block builds: [batch, 12 heads, seq, head_dim 64].
    # 1152 tokens: 1024 leave the 128-token residual window as INT8 blocks.
    g = torch.Generator().manual_seed(0)
    k_tensor, v_tensor = (torch.randn(1, 12, 1152, 64, generator=g) for _ in range(2))
    ns = example.run(k_tensor=k_tensor, v_tensor=v_tensor)
    k, v, stats = ns["k"], ns["v"], ns["stats"]
    assert k.shape == k_tensor.shape and v.shape == v_tensor.shape
    assert sqnr_db(k_tensor, k) > 40 and sqnr_db(v_tensor, v) > 40  # INT8 + exact window
    assert stats["quant_type"] == "int8" and stats["quantized_bytes"] > 0
    assert stats["compression_ratio"] > 2.5
    assert capsys.readouterr().out == f"Compression ratio: {stats['compression_ratio']:.2f}x\n"


# ---------------------------------------------------------------------- 2. adaptive sizing
@case("sizer.record_hit(latency_ms=1.5)")
def adaptive_sizer(example: Example, capsys, **_):
    # `cache` is the cache of example 1 (`on_resize` gives it the sizer's budget).
    cache = create_quantized_kv_cache(quant_type="int8", num_layers=12, num_heads=12, head_dim=64)
    ns = example.run(cache=cache)
    sizer = ns["sizer"]
    try:
        assert sizer.running
        stats = ns["stats"]
        assert stats["hits"] == 1 and stats["misses"] == 1
        assert stats["mean_hit_ms"] == 1.5 and stats["mean_miss_ms"] == 25.0
        level = stats["memory"]["pressure_level"]
        assert level in ("low", "moderate", "high", "critical")
        assert capsys.readouterr().out == f"Memory pressure: {level}\n"
        ns["on_resize"](300.0)
        assert cache.get_stats()["max_size_mb"] == 300.0
    finally:
        sizer.stop()
    assert not sizer.running


# ---------------------------------------------------------------------- 3. distributed cache
@case('coordinator.get_placement("user:123:kv")')
def distributed_cache(example: Example, **_):
    ns = example.run()
    coordinator, nodes = ns["coordinator"], ns["nodes"]
    assert sorted(nodes) == ["node-0", "node-1"]  # replication factor 2 over two nodes
    assert coordinator.nodes["node-1"].port == 8001 and coordinator.nodes["node-1"].address == "192.168.1.10"
    assert coordinator.directory.holders("user:123:kv") == {"node-0", "node-1"}
    assert coordinator.stats()["global_evictions_triggered"] == 1


# ---------------------------------------------------------------------- 4. production hardening
@pytest.fixture
def filled_store(request):
    """A prefix store holding the first chunk of a real prompt, filled by the hook on the shared model."""
    model = request.getfixturevalue("model")
    store = PrefixStore(max_size_mb=8, chunk_size=16)
    hook = attach_prefix_cache(model, store, CacheConfig(quant_type="int8", group_size=8, residual_length=8))
    try:
        prompt = torch.arange(3, 23).unsqueeze(0) % model.config.vocab_size
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2)
    finally:
        hook.detach()
    return store


@case("@breaker.protect")
def production_hardening(example: Example, request, **_):
    # `cache` and `key` are a key-value cache and a key it holds: our prefix store, filled from a real prompt.
    # `check_cache_health` and `trigger_failover` are the user's; `HealthStatus` is used but not imported by the
    # block: it is ours. Run once with a healthy check (no failover) and once with an unhealthy one (failover).
    store = request.getfixturevalue("filled_store")
    (key,) = [info.key for info in store.entry_infos()]
    for check, expect_failover in (
        (consistency_check(store.accounting_problems, "store"), False),
        (lambda: CheckResult.unhealthy("cache unreachable"), True),
    ):
        failovers = []
        ns = example.run(
            cache=store, key=key, check_cache_health=check, HealthStatus=HealthStatus,
            trigger_failover=lambda: failovers.append(True),
        )  # fmt: skip
        assert ns["cache_operation"]() is store.get(key)
        assert ns["breaker"].name == "cache-service" and ns["breaker"].current_state == "closed"
        assert ns["health"].status is (HealthStatus.UNHEALTHY if expect_failover else HealthStatus.HEALTHY)
        assert failovers == ([True] if expect_failover else [])
        hardened = ns["hardened_cache"]
        assert isinstance(hardened, ProductionCacheWrapper) and ns["result"].key == key
        assert hardened.metrics.value("hf_kvcache_hits_total", component="main-cache") == 1


# ---------------------------------------------------------------------- 5. with the user's pipeline
class _UserPipeline:
    """Stands in for the user's own ``serving.unified_pipeline.UnifiedInferencePipeline`` (not part of ours)."""

    def __init__(self, kv_cache_manager):
        self.kv_cache_manager = kv_cache_manager


@case("UnifiedInferencePipeline(kv_cache_manager=kv_cache)")
def with_unified_pipeline(example: Example, monkeypatch, **_):
    serving = types.ModuleType("serving")
    pipeline_module = types.ModuleType("serving.unified_pipeline")
    pipeline_module.UnifiedInferencePipeline = _UserPipeline
    serving.unified_pipeline = pipeline_module
    monkeypatch.setitem(sys.modules, "serving", serving)
    monkeypatch.setitem(sys.modules, "serving.unified_pipeline", pipeline_module)
    ns = example.run()
    kv_cache, sizer = ns["kv_cache"], ns["sizer"]
    try:
        assert isinstance(kv_cache, QuantizedKVCache) and kv_cache.cache_config.quant_type == "int8"
        assert ns["pipeline"].kv_cache_manager is kv_cache and sizer.running
        sizer.resize_callback(48.0)  # what the sizer calls on a decision
        assert kv_cache.get_stats()["max_size_mb"] == 48.0
    finally:
        sizer.stop()


# ---------------------------------------------------------------------- 6. with the user's distributed engine
class _UserEngine:
    """Stands in for the user's own ``distributed.DistributedInferenceEngine`` (not part of ours)."""

    def __init__(self, cache_coordinator):
        self.cache_coordinator = cache_coordinator


@case("DistributedInferenceEngine(cache_coordinator=coordinator)")
def with_distributed_engine(example: Example, monkeypatch, **_):
    # `get_node_id` and `discover_nodes` are the user's discovery: this node's name and its peers' NodeInfo.
    engine_module = types.ModuleType("distributed")
    engine_module.DistributedInferenceEngine = _UserEngine
    monkeypatch.setitem(sys.modules, "distributed", engine_module)
    peers = [NodeInfo(node_id=f"node-{i}", address=f"10.0.0.{i}", port=8001, capacity_mb=4096) for i in (1, 2)]
    ns = example.run(get_node_id=lambda: "node-0", discover_nodes=lambda: list(peers))
    coordinator = ns["coordinator"]
    assert ns["engine"].cache_coordinator is coordinator
    assert coordinator.node_id == "node-0" and coordinator.replication_factor == 2
    assert coordinator.ring.nodes == ["node-0", "node-1", "node-2"]
    assert len(set(coordinator.get_placement("user:123:kv"))) == 2
