"""Hardening with the real PrefixStore and generation hook: store faults never change or fail a request."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_kvcache_plugin import BreakerConfig, CacheConfig, PrefixStore, QuantizedKVCache, attach_prefix_cache
from hf_kvcache_plugin._compat import GENERATE_CACHE_KWARG
from hf_kvcache_plugin.resilience import (
    GuardedStore,
    ServingEndpoint,
    ServingMetrics,
    consistency_check,
    create_breaker,
    harden_cache,
)
from hf_kvcache_plugin.resilience.degradation import entry_problem, prefix_store_problems

from .conftest import HAVE_TEXT, TEXT

CHUNK, NEW = 16, 4
CONFIG = CacheConfig(quant_type="int8", group_size=8, residual_length=16)


@pytest.fixture(scope="module")
def prompt(model_and_tokenizer) -> torch.Tensor:
    model, tok = model_and_tokenizer
    if HAVE_TEXT:
        return tok(TEXT.read_text()[:400], add_special_tokens=False, return_tensors="pt")["input_ids"][:, :50]
    return torch.randint(3, model.config.vocab_size, (1, 50), generator=torch.Generator().manual_seed(0))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def hooked(model):
    metrics, clock = ServingMetrics(), Clock()
    store = PrefixStore(max_size_mb=4, chunk_size=CHUNK)
    hook = attach_prefix_cache(model, store, CONFIG)
    breaker = create_breaker("prefix", BreakerConfig(fail_max=2, reset_timeout_s=30), metrics=metrics, clock=clock)
    harden_cache(hook, "prefix", metrics=metrics, breaker=breaker)
    yield hook, store, metrics, clock
    hook.detach()


def reference(model, prompt):
    """The same cache settings without the hook (the class's generate, not the hooked instance's)."""
    cache = QuantizedKVCache(model.config, cache_config=CONFIG)
    return type(model).generate(
        model, prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **{GENERATE_CACHE_KWARG: cache}
    )


def run(model, prompt):
    return model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


def counter(metrics, name, **labels):
    return metrics.value(name, **labels) or 0.0


def test_harden_cache_guards_the_hooks_store(hooked, model, prompt):
    hook, store, metrics, _ = hooked
    assert isinstance(hook.store, GuardedStore) and hook.store.wrapped is store
    assert harden_cache(hook, "prefix", metrics=metrics) is hook and hook.store.wrapped is store  # idempotent
    expected = reference(model, prompt)
    assert torch.equal(run(model, prompt), expected)  # miss, stores 3 chunks
    assert len(store) == 3
    assert torch.equal(run(model, prompt), expected)  # hit
    assert counter(metrics, "hf_kvcache_hits_total", component="prefix") == 1
    assert counter(metrics, "hf_kvcache_misses_total", component="prefix") == 1
    assert counter(metrics, "hf_kvcache_store_bytes", component="prefix") == store.used_bytes > 0
    assert prefix_store_problems(store) == []


def test_store_faults_give_the_same_tokens_and_the_breaker_recovers(hooked, model, prompt, monkeypatch):
    hook, store, metrics, clock = hooked
    expected = reference(model, prompt)
    run(model, prompt)  # warm: 3 chunks stored
    stored = set(store._slots)

    def down(*args, **kwargs):
        raise ConnectionError("prefix store node unreachable")

    monkeypatch.setattr(store, "lookup", down)
    monkeypatch.setattr(store, "put_chain", down)
    monkeypatch.setattr(PrefixStore, "__contains__", lambda self, key: down())  # dunders are looked up on the class
    for _ in range(3):
        assert torch.equal(run(model, prompt), expected)  # recomputed locally, same greedy tokens
    assert hook.store.state == "open"
    assert counter(metrics, "hf_kvcache_breaker_opens_total", breaker="prefix") == 1
    labels = {"component": "prefix", "operation": "lookup", "reason": "breaker_open"}
    assert counter(metrics, "hf_kvcache_fallbacks_total", **labels) >= 1

    monkeypatch.undo()
    clock.now += 30
    assert torch.equal(run(model, prompt), expected)  # trial lookup hits the entries stored before the outage
    assert hook.store.state == "closed"
    assert set(store._slots) == stored  # nothing acknowledged was lost
    assert counter(metrics, "hf_kvcache_hits_total", component="prefix") == 1


def test_a_request_with_a_failing_cache_path_is_recomputed(hooked, model, prompt, monkeypatch):
    hook, store, metrics, _ = hooked
    endpoint = ServingEndpoint(hook.generate, lambda ids, **kw: type(model).generate(model, ids, **kw), metrics=metrics)
    monkeypatch.setattr(hook, "_load_hits", lambda *a: (_ for _ in ()).throw(RuntimeError("corrupt entry")))
    endpoint(prompt, max_new_tokens=NEW)  # miss: no load, served
    out = endpoint(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)  # hit: load fails -> recompute
    assert out.shape[1] == prompt.shape[1] + NEW
    assert counter(metrics, "hf_kvcache_requests_total", entry_point="generate", outcome="degraded") == 1
    assert counter(metrics, "hf_kvcache_requests_total", entry_point="generate", outcome="served") == 1


def test_entries_with_non_finite_scales_are_never_stored_nor_loaded(model, prompt):
    store = PrefixStore(max_size_mb=4, chunk_size=CHUNK)
    hook = attach_prefix_cache(model, store, CONFIG)
    try:
        run(model, prompt)
        entries = [store.get(k) for k in list(store._slots)]
    finally:
        hook.detach()
    good = entries[0]
    poisoned_keys = list(good.keys)
    poisoned_keys[1] = poisoned_keys[1].map_tensors(lambda t: t.clone())
    poisoned_keys[1].scale[0, 0, 0].fill_(float("inf"))
    bad = dataclasses.replace(good, key=b"x" * 32, keys=tuple(poisoned_keys))
    assert entry_problem(good) is None
    assert entry_problem(bad) == "layer 1 keys have non-finite scales or zeros (NaN/Inf K/V or scale overflow)"

    metrics = ServingMetrics()
    guarded = GuardedStore(PrefixStore(max_size_mb=4, chunk_size=CHUNK), "p", metrics=metrics)
    assert guarded.put_chain([good, bad]) == 1  # the chain is cut before the bad entry
    assert guarded.put(bad) is False
    labels = {"component": "p", "operation": "insert", "reason": "invalid_entry"}
    assert metrics.value("hf_kvcache_fallbacks_total", **labels) == 2

    cache = QuantizedKVCache(model.config, cache_config=CONFIG)
    with pytest.raises(ValueError, match=r"blocks \[0\] have non-finite scales or zeros"):
        cache.load_blocks(list(bad.keys), list(bad.values), torch.float32, "cpu")


def test_store_from_another_model_or_setting_is_a_miss_or_refused(model, prompt):
    store = PrefixStore(max_size_mb=4, chunk_size=CHUNK)
    with attach_prefix_cache(model, store, CONFIG):
        run(model, prompt)
    assert len(store) == 3
    # another quantization setting: another namespace, so nothing matches
    other = dataclasses.replace(CONFIG, quant_type="int4")
    with attach_prefix_cache(model, store, other) as hook:
        run(model, prompt)
        assert hook.records[-1].hit_tokens == 0
    # blocks of another setting loaded by hand are refused with the mismatch named
    entry = store.get(next(iter(store._slots)))
    cache = QuantizedKVCache(model.config, cache_config=other)
    with pytest.raises(ValueError, match=r"key blocks \(8 bits.*do not match this layer's codec \(4 bits"):
        cache.load_blocks(list(entry.keys), list(entry.values), torch.float32, "cpu")


def test_prefix_store_consistency_check(model, prompt):
    store = PrefixStore(max_size_mb=4, chunk_size=CHUNK)
    with attach_prefix_cache(model, store, CONFIG):
        run(model, prompt)
    check = consistency_check(lambda: prefix_store_problems(store), "prefix store")
    assert check().status.value == "healthy"
    store._used_bytes += 8  # an accounting bug
    assert "used_bytes" in check().reason and check().status.value == "degraded"


def test_build_service_wires_guards_health_and_critical_memory(model, prompt):
    import json
    import urllib.error
    import urllib.request

    from hf_kvcache_plugin import parse_config
    from hf_kvcache_plugin.app.service import build_service

    used = {"fraction": 0.5}
    config = parse_config({
        "cache": {"quant_type": "int8", "group_size": 8, "residual_length": 16},
        "prefix_store": {"chunk_size": CHUNK, "max_size_mb": 4},
    })  # fmt: skip
    with build_service(model, config, memory_reader=lambda: used["fraction"], http=True, http_port=0) as svc:
        assert svc.checker.names == ["memory", "serving_progress", "breakers", "prefix_store"]
        svc.endpoint(prompt, max_new_tokens=NEW)
        assert len(svc.store) == 3 and svc.checker.readiness().status.value == "healthy"
        used["fraction"] = 0.97
        report = svc.checker.readiness()
        assert not report.ok and report.reasons[0].startswith("memory: memory 97% used (critical)")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(svc.server.url + "/readyz", timeout=10)
        assert info.value.code == 503 and json.loads(info.value.read())["status"] == "unhealthy"
        other = prompt.flip(1)
        svc.endpoint(other, max_new_tokens=NEW)  # served, but its chunks are not stored
        assert len(svc.store) == 3
        labels = {"component": "prefix_store", "operation": "insert", "reason": "memory_critical"}
        assert svc.metrics.value("hf_kvcache_fallbacks_total", **labels) == 1
        assert svc.outcomes()["served"] == 2
    assert "generate" not in model.__dict__  # the hook is detached
