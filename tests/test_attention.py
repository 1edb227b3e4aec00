"""Fused attention over the quantized cache: equal to dequantize-then-SDPA on the same cache."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_kvcache_plugin import QuantizedKVCache, create_quantized_kv_cache
from hf_kvcache_plugin.attention import (
    QUANTIZED_ATTENTION,
    attention_from_layer,
    enable_quantized_attention,
    quantized_attention_forward,
)
from hf_kvcache_plugin._compat import GENERATE_CACHE_KWARG

from .attention_reference import dequantize_then_sdpa, rel_err


def reference(query, layer, mask, scaling):
    """SDPA in float32 over the cache's own dequantization (``layer.dequantized()``, in the compute dtype)."""
    return dequantize_then_sdpa(query, layer, mask, scaling, history_dtype=None)


# one rounding of a value to bf16 is off by at most 2**-9 relative; the fused output is rounded once
BF16_OUTPUT_ROUNDING = 2**-8


@settings(max_examples=40, deadline=None)
@given(
    quant_type=st.sampled_from(["int8", "int4", "int2", "mixed"]),
    axes=st.sampled_from([("channel", "token"), ("token", "channel"), ("channel", "channel"), ("token", "token")]),
    symmetric=st.booleans(),
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    n_rep=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([8, 16, 32, 48]),
    group=st.sampled_from([4, 8]),
    residual_blocks=st.integers(0, 2),
    sinks=st.integers(0, 5),
    prefill=st.integers(1, 90),
    q_len=st.integers(1, 5),
    chunk_tokens=st.sampled_from([8, 32, 512]),
    pad=st.integers(0, 6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    cpu_kernel=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_fused_equals_dequantize_then_sdpa(
    quant_type, axes, symmetric, batch, kv_heads, n_rep, head_dim, group, residual_blocks, sinks, prefill, q_len,
    chunk_tokens, pad, dtype, cpu_kernel, seed,
):
    torch.manual_seed(seed)
    cache = create_quantized_kv_cache(
        quant_type, num_layers=1, num_heads=kv_heads, head_dim=head_dim, group_size=group,
        residual_length=group * residual_blocks, sink_tokens=sinks, key_axis=axes[0], value_axis=axes[1],
        symmetric=symmetric, mixed_int8_tokens=2 * group,
    )
    k = torch.randn(batch, kv_heads, prefill + q_len, head_dim).to(dtype) * 2
    v = torch.randn(batch, kv_heads, prefill + q_len, head_dim).to(dtype)
    cache.update(k[:, :, :prefill], v[:, :, :prefill], 0)
    cache.update(k[:, :, prefill:], v[:, :, prefill:], 0)
    layer = cache.layers[0]
    total = prefill + q_len
    query = torch.randn(batch, kv_heads * n_rep, q_len, head_dim).to(dtype)
    # causal over the new queries plus left padding on the last sequence
    mask = torch.ones(total, total, dtype=torch.bool).tril()[-q_len:][None, None].repeat(batch, 1, 1, 1)
    mask[-1, :, :, : min(pad, prefill)] = False
    scaling = head_dim**-0.5
    out = attention_from_layer(query, layer, mask, scaling, chunk_tokens=chunk_tokens, cpu_kernel=cpu_kernel)
    assert out.dtype == dtype
    if dtype == torch.float32:
        assert rel_err(out, reference(query, layer, mask, scaling)) <= 1e-5
        return
    # bf16: "the same cache" is its codes and scales; the truth is SDPA in float32 over them dequantized in
    # float32. The cache's own bf16 dequantization (layer.dequantized(), the unfused path) rounds three times
    # per value (scale fp16 -> bf16, code * scale, + zero) and lands up to ~2e-2 from that truth on small heads;
    # the fused path computes in float32 and rounds its output once. So the fused output must be within 1e-2
    # of the truth and no farther from it than the bf16 path is (give or take its own output rounding).
    truth = dequantize_then_sdpa(query, layer, mask, scaling)
    bf16_path = dequantize_then_sdpa(query, layer, mask, scaling, history_dtype=None, compute_dtype=dtype)
    assert rel_err(out, truth) <= 1e-2
    assert rel_err(out, truth) <= max(rel_err(bf16_path, truth), BF16_OUTPUT_ROUNDING)


def test_no_mask_means_causal_for_several_queries():
    cache = create_quantized_kv_cache("int4", num_layers=1, num_heads=2, head_dim=16, group_size=8, residual_length=8)
    k, v = torch.randn(1, 2, 43, 16), torch.randn(1, 2, 43, 16)
    cache.update(k[:, :, :40], v[:, :, :40], 0)
    cache.update(k[:, :, 40:], v[:, :, 40:], 0)
    q = torch.randn(1, 2, 3, 16)
    causal = torch.ones(43, 43, dtype=torch.bool).tril()[-3:][None, None]
    out = attention_from_layer(q, cache.layers[0], None, 0.25)
    assert rel_err(out, reference(q, cache.layers[0], causal, 0.25)) < 1e-5


@pytest.fixture
def fused_model(model):
    enable_quantized_attention(model)
    yield model
    model.set_attn_implementation("sdpa")


def _generate(model, cache, prompt, **kwargs):
    ids = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    return model.generate(**ids, do_sample=False, max_new_tokens=60, min_new_tokens=60,
                          **{GENERATE_CACHE_KWARG: cache}, **kwargs)


@pytest.mark.parametrize("quant_type", ["int8", "int4", "mixed"])
def test_generation_fused_equals_unfused(model, prompts, quant_type):
    options = dict(group_size=8, residual_length=16, mixed_int8_tokens=16)
    plain = dict(options, attention="dequantize")
    unfused = [_generate(model, QuantizedKVCache(model.config, quant_type, **plain), p) for p in prompts[:3]]
    enable_quantized_attention(model)
    try:
        caches = [QuantizedKVCache(model.config, quant_type, **options) for _ in prompts[:3]]
        fused = [_generate(model, c, p) for c, p in zip(caches, prompts[:3])]
        assert all(c.uses_fused_attention for c in caches)
        beams = _generate(model, QuantizedKVCache(model.config, quant_type, **options), prompts[3], num_beams=3)
        lookup = _generate(model, QuantizedKVCache(model.config, quant_type, group_size=8, residual_length=0),
                           torch.cat([prompts[1]] * 3, dim=1), prompt_lookup_num_tokens=8)
    finally:
        model.set_attn_implementation("sdpa")
    for a, b in zip(unfused, fused):
        assert torch.equal(a, b)
    assert torch.equal(beams, _generate(model, QuantizedKVCache(model.config, quant_type, **plain), prompts[3],
                                        num_beams=3))
    assert torch.equal(lookup, _generate(model, QuantizedKVCache(model.config, quant_type, group_size=8,
                                                                 residual_length=0, attention="dequantize"),
                                         torch.cat([prompts[1]] * 3, dim=1), prompt_lookup_num_tokens=8))


def test_fused_path_is_the_default_for_sdpa_models(model, prompts, monkeypatch):
    from hf_kvcache_plugin.layer import QuantizedKVLayer

    model.set_attn_implementation("sdpa")
    try:
        untouched = QuantizedKVCache(model.config, "int4", group_size=8, residual_length=8, attention="dequantize")
        assert model.config._attn_implementation == "sdpa" and not untouched.uses_fused_attention
        cache = QuantizedKVCache(model.config, "int4", group_size=8, residual_length=8)
        assert model.config._attn_implementation == "kvquant_sdpa" and cache.uses_fused_attention
        calls = []
        original = QuantizedKVLayer._materialize
        monkeypatch.setattr(QuantizedKVLayer, "_materialize", lambda self: calls.append(1) or original(self))
        _generate(model, cache, prompts[1])
        assert calls == [] and cache.get_stats()["quantized_bytes"] > 0
        # an explicit choice other than SDPA is the user's: left alone
        model.set_attn_implementation("eager")
        QuantizedKVCache(model.config, "int4", group_size=8, residual_length=8)
        assert model.config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")


def test_fused_path_never_materialises_the_history(fused_model, prompts, monkeypatch):
    cache = QuantizedKVCache(fused_model.config, "int4", group_size=8, residual_length=8)
    calls = []
    from hf_kvcache_plugin.layer import QuantizedKVLayer

    original = QuantizedKVLayer._materialize
    monkeypatch.setattr(QuantizedKVLayer, "_materialize", lambda self: calls.append(1) or original(self))
    _generate(fused_model, cache, prompts[1])
    assert calls == []
    assert cache.get_stats()["quantized_bytes"] > 0


def test_dequantize_option_keeps_the_standard_path(fused_model, prompts):
    cache = QuantizedKVCache(fused_model.config, "int4", group_size=8, residual_length=8, attention="dequantize")
    assert not cache.uses_fused_attention
    _generate(fused_model, cache, prompts[0])


def test_other_caches_get_plain_sdpa(fused_model, prompts, model):
    from transformers import DynamicCache

    out = _generate(fused_model, DynamicCache(config=fused_model.config), prompts[0])
    fused_model.set_attn_implementation("sdpa")
    ref = _generate(model, DynamicCache(config=model.config), prompts[0])
    assert torch.equal(out, ref)


def test_unsupported_features_fall_back_once_with_a_log(caplog):
    cache = create_quantized_kv_cache("int4", num_layers=1, num_heads=2, head_dim=16, group_size=8, residual_length=8)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    channel: dict = {}
    cache.fused_update(k[:, :, :1], v[:, :, :1], 0, channel)
    module = torch.nn.Module()
    q = torch.randn(1, 2, 1, 16)
    with caplog.at_level(logging.WARNING):
        out, _ = quantized_attention_forward(module, q, None, None, None, scaling=0.25, softcap=30.0, **channel)
    assert "softcapping" in caplog.text and QUANTIZED_ATTENTION in caplog.text
    keys, values = layer.dequantized()
    scores = torch.tanh(q @ keys.transpose(-1, -2) * 0.25 / 30.0) * 30.0
    ref = (torch.softmax(scores, -1) @ values).transpose(1, 2)
    assert rel_err(out, ref) < 1e-5
    assert layer.get_seq_length() == 41


def _fused_cache_after_prefill(model):
    enable_quantized_attention(model)
    cache = QuantizedKVCache(model.config, "int4", group_size=8, residual_length=8)
    cfg = model.config
    shape = (1, cfg.num_key_value_heads, 40, cfg.head_dim)
    k, v = torch.randn(shape), torch.randn(shape)
    for idx in range(cfg.num_hidden_layers):
        cache.update(k, v, idx)
    return cache


def test_models_that_pass_no_attention_kwargs_get_the_step_on_the_keys(model):
    """transformers 5.23's Llama calls update(key, value, layer_idx) alone: the step rides on the returned keys."""
    try:
        cache = _fused_cache_after_prefill(model)
        cfg = model.config
        k_new, v_new = torch.randn(1, cfg.num_key_value_heads, 1, cfg.head_dim), torch.randn(1, cfg.num_key_value_heads, 1, cfg.head_dim)
        keys, values = cache.update(k_new, v_new, 0)
        assert keys is k_new and keys.shape[-2] == 1  # nothing materialised
        layer = cache.layers[0]
        q = torch.randn(1, cfg.num_attention_heads, 1, cfg.head_dim)
        expected = reference(q, layer, None, 0.3)
        out, _ = quantized_attention_forward(torch.nn.Module(), q, keys, values, None, scaling=0.3)
        assert rel_err(out.transpose(1, 2), expected) < 1e-5
        assert not layer.flush_pending and layer.get_seq_length() == 41
    finally:
        model.set_attn_implementation("sdpa")


def test_a_step_the_attention_never_read_is_an_error_not_wrong_tokens(model):
    try:
        cache = _fused_cache_after_prefill(model)
        cfg = model.config
        new = torch.randn(1, cfg.num_key_value_heads, 1, cfg.head_dim)
        cache.update(new, new, 0)  # handed over; plain SDPA would now attend to this one token only
        with pytest.raises(RuntimeError, match="layer 0: the model's attention did not read the quantized history"):
            cache.update(new.clone(), new.clone(), 0)
    finally:
        model.set_attn_implementation("sdpa")


def test_a_model_on_eager_attention_is_told_once_why_decode_dequantizes(model, prompts, caplog):
    model.set_attn_implementation("eager")
    try:
        with caplog.at_level(logging.INFO, logger="hf_kvcache_plugin.attention.dispatch"):
            for _ in range(2):
                cache = QuantizedKVCache(model.config, "int4", group_size=8, residual_length=8)
                assert not cache.uses_fused_attention
        lines = [r.getMessage() for r in caplog.records if "not SDPA" in r.getMessage()]
        assert len(lines) <= 1  # once per process: an earlier test may have logged it already
        from hf_kvcache_plugin.attention import dispatch

        assert any("runs 'eager' attention, not SDPA" in m for m in dispatch._logged)
    finally:
        model.set_attn_implementation("sdpa")
