"""The cache's byte budget: exact prediction of what an update leaves, refusal with exact bytes, resize."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from hf_kvcache_plugin import (
    CacheBudgetExceeded,
    CacheConfig,
    ConfigError,
    QuantizedKVCache,
    QuantizedKVLayer,
    create_quantized_kv_cache,
    parse_config,
)
from hf_kvcache_plugin._compat import GENERATE_CACHE_KWARG

from .conftest import tiny_llama_config

MIB = 2**20


def tokens(n: int, heads: int = 2, head_dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, heads, n, head_dim, generator=g), torch.randn(1, heads, n, head_dim, generator=g)


@pytest.mark.parametrize(
    "options",
    [
        {"quant_type": "int8"},
        {"quant_type": "int4", "symmetric": True},
        {"quant_type": "int2", "residual_length": 0},
        {"quant_type": "mixed", "mixed_int8_tokens": 16},
        {"quant_type": "int4", "sink_tokens": 4, "key_axis": "token"},
        {"quant_type": "int4", "scale_dtype": "compute", "value_axis": "channel"},
    ],
)
def test_the_prediction_is_what_the_layer_holds_after_each_append(options):
    cfg = CacheConfig(**{"group_size": 8, "residual_length": 16, **options})
    cache = QuantizedKVCache(None, cache_config=cfg, num_layers=1)
    layer = cache.layers[0]
    assert isinstance(layer, QuantizedKVLayer) and layer.nbytes == 0
    for step, n in enumerate([37, *[1] * 20, 9, 64]):
        k, v = tokens(n, seed=step)
        predicted = layer.nbytes_after_append(k, v)
        layer.append(k, v)
        assert layer.nbytes == predicted, f"after append {step} of {n} tokens"
        stats = cache.get_stats()
        assert stats["total_bytes"] == predicted


@pytest.mark.parametrize("quant_type,int8_tokens", [("int4", 512), ("mixed", 16)])
def test_loading_blocks_is_predicted_exactly_and_refused_over_the_budget(quant_type, int8_tokens):
    settings = {"quant_type": quant_type, "group_size": 8, "residual_length": 0, "mixed_int8_tokens": int8_tokens}
    source = QuantizedKVCache(None, num_layers=2, **{**settings, "mixed_int8_tokens": 512})
    for i in range(2):
        source.store(i, *tokens(32, seed=i))
    keys = [layer.quantized_keys.take_blocks(0, 4) for layer in source.layers]
    values = [layer.quantized_values.take_blocks(0, 4) for layer in source.layers]
    target = QuantizedKVCache(None, num_layers=2, **settings)
    predicted = sum(layer.nbytes_after_load(k, v, torch.float32) for layer, k, v in zip(target.layers, keys, values))
    target.resize((predicted - 1) / MIB)
    refusal = rf"loading 4 block\(s\) per layer is refused: the cache would hold {predicted} bytes"
    with pytest.raises(CacheBudgetExceeded, match=refusal):
        target.load_blocks(keys, values, torch.float32, "cpu")
    assert target.get_seq_length() == 0
    target.resize(predicted / MIB)
    target.load_blocks(keys, values, torch.float32, "cpu")
    assert target.get_stats()["total_bytes"] == predicted and target.get_seq_length() == 32


def test_a_store_over_the_budget_is_refused_with_the_exact_bytes_and_nothing_is_appended():
    # int8, asymmetric, fp16 scales, float32 K/V, 2 heads, head_dim 16, group 8, window 8: 16 tokens leave one
    # block per stream (8*2*16 codes + 2*16 groups * 2 bytes * (scale, zero) = 384 bytes) and 8 exact tokens
    # (8 tokens * 2 heads * (16 + 16) * 4 bytes = 2048 bytes): 2816 bytes
    needed = 2 * (8 * 2 * 16 + 2 * 16 * 2 * 2) + 8 * 2 * 32 * 4
    cache = create_quantized_kv_cache(
        quant_type="int8", num_layers=2, num_heads=2, head_dim=16, group_size=8, residual_length=8,
        max_size_mb=(needed - 1) / MIB, budget_policy="refuse",  # re-packing its own block would fit it
    )  # fmt: skip
    k, v = tokens(16)
    with pytest.raises(CacheBudgetExceeded) as refused:
        cache.store(layer_id=0, k=k, v=v)
    err = refused.value
    assert (err.budget_bytes, err.needed_bytes, err.held_bytes) == (needed - 1, needed, 0)
    assert f"would hold {needed} bytes" in str(err) and f"budget `max_size_mb` is {needed - 1} bytes" in str(err)
    assert cache.get_seq_length(0) == 0 and cache.get_stats()["total_bytes"] == 0
    cache.resize(needed / MIB)
    cache.store(layer_id=0, k=k, v=v)
    assert cache.get_stats()["total_bytes"] == needed and cache.get_stats()["budget_bytes"] == needed


def test_store_takes_the_specification_keywords_and_ours_but_not_both():
    cache = create_quantized_kv_cache(quant_type="int8", num_layers=1, group_size=8, residual_length=8)
    k, v = tokens(4)
    cache.store(layer_id=0, key_states=k, value_states=v)
    cache.store(0, k=k, v=v)
    assert cache.get_seq_length(0) == 8
    with pytest.raises(ValueError, match="pass `key_states` or `k`, not both"):
        cache.store(0, k, v, k=k)
    with pytest.raises(ValueError, match=r"`store` needs `value_states` \(or `v`\)"):
        cache.store(0, k=k)
    with pytest.raises(ValueError, match=r"`layer_id` has to be in \[0, 0\] but got 3"):
        cache.store(3, k=k, v=v)


def _generate(model, cache, prompt, new_tokens):
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          **{GENERATE_CACHE_KWARG: cache})


@pytest.fixture(scope="module")
def small_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(head_dim=16, layers=3)).eval()


def test_a_model_step_is_refused_whole_so_every_layer_keeps_the_same_length(small_model):
    prompt = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    settings = {"quant_type": "int4", "group_size": 8, "residual_length": 8, "budget_policy": "refuse"}
    unbounded = QuantizedKVCache(small_model.config, **settings)
    expected = _generate(small_model, unbounded, prompt, 24)
    held = unbounded.get_stats()["total_bytes"]
    # room for the whole generation (a state just before a flush holds more than the last one): nothing changes
    roomy = QuantizedKVCache(small_model.config, max_size_mb=2 * held / MIB, **settings)
    assert torch.equal(_generate(small_model, roomy, prompt, 24), expected)
    # room for the prompt and a few tokens only: what a cache holds a few decode steps in
    few = QuantizedKVCache(small_model.config, **settings)
    _generate(small_model, few, prompt, 4)
    tight = QuantizedKVCache(small_model.config, max_size_mb=few.get_stats()["total_bytes"] / MIB, **settings)
    with pytest.raises(CacheBudgetExceeded, match=r"layer 0: an update of 1 token\(s\) for each of the 3 layers"):
        _generate(small_model, tight, prompt, 24)
    lengths = {layer.get_seq_length() for layer in tight.layers}
    assert len(lengths) == 1 and 40 < lengths.pop() < 40 + 24
    assert tight.get_stats()["total_bytes"] <= tight.budget_bytes


def test_a_model_step_is_checked_once_and_a_lone_layer_update_on_its_own(small_model, monkeypatch):
    import hf_kvcache_plugin.cache_budget as cache_module

    checks = []
    real = cache_module.fit_to_budget
    monkeypatch.setattr(cache_module, "fit_to_budget", lambda layers, after, *a: checks.append(sorted(after())) or real(
        layers, after, *a))
    cache = QuantizedKVCache(small_model.config, quant_type="int4", group_size=8, residual_length=8, max_size_mb=1)
    prompt = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    _generate(small_model, cache, prompt, 5)
    assert checks == [[0, 1, 2]] * 5  # one admission per forward step, for its 3 layers
    checks.clear()
    k, v = cache.layers[2].dequantized()
    cache.update(k[:, :, :1], v[:, :, :1], 2)  # not part of a step: checked alone
    assert checks == [[2]]


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "big", True, None])
def test_resize_refuses_what_is_not_a_positive_finite_budget_naming_it(bad):
    cache = create_quantized_kv_cache(num_layers=1)
    message = rf"`new_size_mb` has to be a positive finite number of MiB .* but got {bad!r}"
    with pytest.raises(ValueError, match=message):
        cache.resize(bad)
    assert cache.max_size_mb is None


def test_resize_below_what_is_held_is_recorded_and_refuses_the_next_update(caplog):
    cache = create_quantized_kv_cache(
        quant_type="int8", num_layers=1, group_size=8, residual_length=8, budget_policy="refuse"
    )
    cache.store(0, *tokens(64))
    held = cache.get_stats()["total_bytes"]
    with caplog.at_level(logging.WARNING, logger="hf_kvcache_plugin.cache"):
        cache.resize(held / 2 / MIB)
    assert f"while the cache holds {held} bytes: the next update shrinks it (budget_policy 'refuse')" in caplog.text
    assert cache.get_stats()["max_size_mb"] == held / 2 / MIB
    with pytest.raises(CacheBudgetExceeded, match=f"it holds {held} bytes now"):
        cache.store(0, *tokens(1))
    assert cache.get_seq_length(0) == 64


def test_the_budget_is_a_config_key():
    assert CacheConfig().max_size_mb is None
    assert QuantizedKVCache(None, num_layers=1, max_size_mb=2).get_stats()["budget_bytes"] == 2 * MIB
    from_yaml = QuantizedKVCache.from_config(parse_config({"cache": {"max_size_mb": 3}}), num_layers=1)
    assert from_yaml.max_size_mb == 3.0 and from_yaml.budget_bytes == 3 * MIB
    for bad in (0, -3, math.inf, "1MB"):
        with pytest.raises(ConfigError, match="max_size_mb"):
            CacheConfig(max_size_mb=bad)
