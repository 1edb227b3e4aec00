"""ServingEndpoint: a request never fails because the cache did; bad prompts are clear errors; limits apply."""

from __future__ import annotations

import pytest
import torch

from hf_kvcache_plugin import QuantizedKVCache
from hf_kvcache_plugin._compat import GENERATE_CACHE_KWARG
from hf_kvcache_plugin.resilience import RateLimiter, RateLimitExceeded, ServingEndpoint, ServingMetrics

NEW = 6


class TickClock:
    """Advances by one millisecond per reading: latencies become counts of clock readings."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


@pytest.fixture(scope="module")
def plain(model):
    def generate(input_ids, **kwargs):
        return model.generate(input_ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **kwargs)

    return generate


@pytest.fixture(scope="module")
def quantized(model):
    def generate(input_ids, **kwargs):
        cache = QuantizedKVCache(model.config, "int8", residual_length=8)
        options = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False, GENERATE_CACHE_KWARG: cache}
        return model.generate(input_ids, **options, **kwargs)

    return generate


def requests(metrics: ServingMetrics, outcome: str) -> float:
    return metrics.value("hf_kvcache_requests_total", entry_point="generate", outcome=outcome) or 0.0


def test_served_requests_record_prefill_and_per_token_latency(quantized, plain, prompts):
    metrics = ServingMetrics()
    endpoint = ServingEndpoint(quantized, plain, metrics=metrics, clock=TickClock())
    out = endpoint(prompts[0])
    assert out.shape[1] == prompts[0].shape[1] + NEW
    assert requests(metrics, "served") == 1
    assert metrics.value("hf_kvcache_prefill_duration_seconds_count", entry_point="generate") == 1
    # one gap per new token after the first
    assert metrics.value("hf_kvcache_decode_token_duration_seconds_count", entry_point="generate") == NEW - 1


def test_a_failing_cache_path_is_recomputed_without_the_cache(plain, prompts, model):
    metrics = ServingMetrics()

    def broken(input_ids, **kwargs):
        raise RuntimeError("quantized cache: CUDA error: an illegal memory access was encountered")

    endpoint = ServingEndpoint(broken, plain, metrics=metrics)
    out = endpoint(prompts[1])
    assert torch.equal(out, plain(prompts[1]))
    assert requests(metrics, "degraded") == 1 and requests(metrics, "failed") == 0
    labels = {"component": "generate", "operation": "generate", "reason": "recompute"}
    assert metrics.value("hf_kvcache_fallbacks_total", **labels) == 1
    assert metrics.value("hf_kvcache_errors_total", component="generate", kind="RuntimeError") == 1


def test_a_cache_that_meets_nan_keeps_serving(model, prompts):
    """NaN K/V in one layer: the cache keeps the blocks exact and the request completes."""
    metrics = ServingMetrics()
    caches = []

    def generate(input_ids, **kwargs):
        cache = QuantizedKVCache(model.config, "int4", residual_length=0)
        original = cache.layers[0].update

        def poisoned(k, v, *args, **kw):
            return original(k.clone().fill_(float("nan")), v, *args, **kw)

        cache.layers[0].update = poisoned
        caches.append(cache)
        return model.generate(input_ids, max_new_tokens=NEW, do_sample=False, **{GENERATE_CACHE_KWARG: cache}, **kwargs)

    endpoint = ServingEndpoint(generate, metrics=metrics)
    endpoint(prompts[3])
    stats = caches[0].get_stats()
    assert stats["fallback_events"] > 0 and requests(metrics, "served") == 1


def test_when_both_paths_fail_the_request_fails_with_the_fallbacks_error(prompts):
    metrics = ServingMetrics()

    def broken(input_ids, **kwargs):
        raise RuntimeError("cache broken")

    def also_broken(input_ids, **kwargs):
        raise OSError("model weights unreadable")

    with pytest.raises(OSError, match="model weights unreadable"):
        ServingEndpoint(broken, also_broken, metrics=metrics)(prompts[0])
    assert requests(metrics, "failed") == 1
    with pytest.raises(RuntimeError, match="cache broken"):
        ServingEndpoint(broken, None, metrics=metrics)(prompts[0])
    assert requests(metrics, "failed") == 2


@pytest.mark.parametrize(
    "bad,message",
    [
        (torch.zeros(1, 0, dtype=torch.long), r"the prompt is empty \(`input_ids` of shape \(1, 0\)\)"),
        (torch.zeros(0, 5, dtype=torch.long), r"the prompt is empty"),
        (torch.zeros(5, dtype=torch.long), r"has to be 2-d \[batch, seq_len\] but got shape \(5,\)"),
        (torch.zeros(1, 5), r"has to hold integer token ids but got dtype torch.float32"),
        ([[1, 2, 3]], r"has to be a tensor \[batch, seq_len\] of token ids but got list"),
    ],
)
def test_bad_prompts_are_clear_errors_before_any_work(bad, message, plain):
    metrics = ServingMetrics()
    calls = []
    endpoint = ServingEndpoint(lambda *a, **k: calls.append(1), plain, metrics=metrics)
    with pytest.raises(ValueError, match=message):
        endpoint(bad)
    assert calls == [] and requests(metrics, "invalid") == 1


def test_input_that_both_paths_refuse_is_invalid_not_failed(prompts):
    metrics = ServingMetrics()

    def refuses(input_ids, **kwargs):
        raise ValueError("`max_new_tokens` has to be > 0")

    with pytest.raises(ValueError, match="max_new_tokens"):
        ServingEndpoint(refuses, refuses, metrics=metrics)(prompts[0])
    assert requests(metrics, "invalid") == 1 and requests(metrics, "failed") == 0


def test_rate_limit_per_client(plain, prompts):
    now = {"t": 0.0}
    limiter = RateLimiter(rate_per_s=1.0, burst=1, clock=lambda: now["t"])
    metrics = ServingMetrics()
    endpoint = ServingEndpoint(plain, metrics=metrics, limiter=limiter)
    endpoint(prompts[0], client="alice")
    with pytest.raises(RateLimitExceeded, match="client 'alice' is over its rate limit"):
        endpoint(prompts[0], client="alice")
    endpoint(prompts[0], client="bob")
    now["t"] += 1.0
    endpoint(prompts[0], client="alice")
    assert requests(metrics, "rate_limited") == 1 and requests(metrics, "served") == 3
