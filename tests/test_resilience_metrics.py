"""ServingMetrics: a registry per instance, Prometheus naming, watched caches and stores, the plain dict."""

from __future__ import annotations

import gc

import pytest
import torch
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from hf_kvcache_plugin import create_quantized_kv_cache
from hf_kvcache_plugin.resilience import MetricsCollector, ServingMetrics, harden_cache


def test_instances_never_collide_and_never_touch_the_global_registry():
    global_names = set(REGISTRY._names_to_collectors)
    a, b = ServingMetrics(), ServingMetrics()
    a.hits.labels("store").inc(3)
    assert a.value("hf_kvcache_hits_total", component="store") == 3
    assert b.value("hf_kvcache_hits_total", component="store") is None
    assert set(REGISTRY._names_to_collectors) == global_names


def test_names_follow_prometheus_conventions():
    metrics = ServingMetrics()
    families = list(text_string_to_metric_families(metrics.exposition().decode()))
    assert families
    for family in families:
        assert family.name.startswith("hf_kvcache_"), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        if "bytes" in family.name:
            assert family.name.endswith("_bytes"), family.name
    names = {f.name for f in families}
    expected = {
        "hf_kvcache_requests", "hf_kvcache_hits", "hf_kvcache_misses", "hf_kvcache_fallbacks", "hf_kvcache_errors",
        "hf_kvcache_breaker_opens", "hf_kvcache_breaker_recoveries", "hf_kvcache_evictions",
        "hf_kvcache_breaker_state", "hf_kvcache_memory_pressure_level", "hf_kvcache_memory_used_ratio",
        "hf_kvcache_cache_bytes", "hf_kvcache_store_bytes", "hf_kvcache_store_budget_bytes",
        "hf_kvcache_lookup_duration_seconds", "hf_kvcache_prefill_duration_seconds",
        "hf_kvcache_decode_token_duration_seconds",
    }  # fmt: skip
    assert expected <= names, expected - names
    counters = {f.name for f in families if f.type == "counter"}
    text = metrics.exposition().decode()
    for name in counters:
        assert f"# TYPE {name}_total counter" in text


def test_plain_dict_holds_every_sample():
    metrics = ServingMetrics()
    metrics.record_fallback("store", "insert", "error", 2)
    metrics.record_error("store", TimeoutError())
    metrics.lookup_seconds.labels("store").observe(0.003)
    metrics.record_pressure("high", 0.9)
    d = metrics.as_dict()
    assert d['hf_kvcache_fallbacks_total{component="store",operation="insert",reason="error"}'] == 2
    assert d['hf_kvcache_errors_total{component="store",kind="TimeoutError"}'] == 1
    assert d['hf_kvcache_lookup_duration_seconds_count{component="store"}'] == 1
    assert d['hf_kvcache_lookup_duration_seconds_bucket{component="store",le="0.005"}'] == 1
    assert d["hf_kvcache_memory_pressure_level"] == 2 and d["hf_kvcache_memory_used_ratio"] == 0.9


def test_watched_cache_reports_live_bytes_and_full_precision_blocks_and_is_not_kept_alive():
    metrics = ServingMetrics()
    cache = create_quantized_kv_cache("int4", num_layers=1, group_size=8, residual_length=8)
    assert harden_cache(cache, "session", metrics=metrics) is cache
    k = torch.randn(1, 2, 40, 8)
    k[0, 0, 2, 2] = float("nan")
    cache.update(k, torch.randn(1, 2, 40, 8), 0)
    assert metrics.value("hf_kvcache_cache_bytes", component="session") == cache.get_stats()["total_bytes"]
    assert metrics.value("hf_kvcache_cache_full_precision_blocks", component="session") == 1
    del cache
    gc.collect()
    assert metrics.value("hf_kvcache_cache_bytes", component="session") == 0


class StatsStore:
    def __init__(self):
        self.fail = False
        self.figures = {"used_bytes": 100, "max_bytes": 1000, "entries": 2, "evictions": 5}

    def stats(self):
        if self.fail:
            raise ConnectionError("down")
        return self.figures


def test_watched_store_figures_are_read_at_scrape_time_and_a_failing_store_does_not_break_the_scrape():
    metrics, store = ServingMetrics(), StatsStore()
    metrics.watch_store(store, "prefix")
    assert metrics.value("hf_kvcache_store_bytes", component="prefix") == 100
    assert metrics.value("hf_kvcache_store_budget_bytes", component="prefix") == 1000
    assert metrics.value("hf_kvcache_evictions_total", component="prefix") == 5
    store.figures["evictions"] = 7
    assert metrics.value("hf_kvcache_evictions_total", component="prefix") == 7
    store.fail = True
    assert metrics.value("hf_kvcache_store_bytes", component="prefix") is None
    assert b"hf_kvcache_hits_total" in metrics.exposition()


@pytest.mark.parametrize("level,index", [("low", 0), ("moderate", 1), ("high", 2), ("critical", 3)])
def test_pressure_levels_map_to_gauge_values(level, index):
    metrics = ServingMetrics()
    metrics.record_pressure(level, 0.5)
    assert metrics.value("hf_kvcache_memory_pressure_level") == index


def test_callers_add_counters_gauges_and_histograms_of_their_own():
    metrics = MetricsCollector()
    assert MetricsCollector is ServingMetrics
    retries = metrics.counter("app_retries", "Retries of the app", ["reason"])
    retries.labels("timeout").inc(2)
    assert metrics.counter("app_retries", labelnames=["reason"]) is retries  # the same one on second use
    metrics.gauge("app_queue_depth").set(7)
    metrics.histogram("app_wait_seconds", buckets=[0.1, 1.0]).observe(0.5)
    assert metrics.value("app_retries_total", reason="timeout") == 2
    assert metrics.value("app_queue_depth") == 7
    assert metrics.value("app_wait_seconds_bucket", le="1.0") == 1 and metrics.value("app_wait_seconds_count") == 1
    assert b"app_queue_depth 7.0" in metrics.exposition()
    with pytest.raises(ValueError, match=r"metric 'app_retries' is a counter with labels \['reason'\]; it cannot be "
                                         r"asked for as a gauge with labels \[\]"):
        metrics.gauge("app_retries")
