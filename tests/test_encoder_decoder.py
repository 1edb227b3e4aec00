"""Encoder-decoder models (T5, BART, Whisper) with a quantized self-attention cache, and the history read through
``layers[i].keys`` / ``.values`` / CPU offloading as transformers' own layers offer them."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, EncoderDecoderCache, LlamaConfig, LlamaForCausalLM

from hf_kvcache_plugin import QuantizedKVCache, quantized_encoder_decoder_cache
from hf_kvcache_plugin.attention import FUSED_STEP_KEY, FusedStep, enable_quantized_attention
from hf_kvcache_plugin.attention.dispatch import quantized_attention_forward
from hf_kvcache_plugin.layer import QuantizedKVLayer
from tests.model_matrix import (
    build_model,
    dynamic_cache,
    encoder_inputs,
    greedy_sequence,
    make_cache,
    teacher_forced_logits,
)


@pytest.mark.parametrize("name", ["t5", "bart", "whisper"])
def test_cross_attention_quantized_too(name):
    """With ``quantize_cross_attention`` the encoder's K/V are held quantized (read back through ``.keys``);
    logits stay within 5% of their range of DynamicCache's (the INT4 bound of the architecture matrix)."""
    model = build_model(name)
    sequence = greedy_sequence(model, dynamic_cache(model))
    reference = teacher_forced_logits(model, sequence, dynamic_cache(model))
    cache = make_cache(model, "int4", quantize_cross_attention=True)
    logits = teacher_forced_logits(model, sequence, cache)
    assert isinstance(cache, EncoderDecoderCache)
    cross = cache.cross_attention_cache
    assert isinstance(cross, QuantizedKVCache) and cross.cache_config.residual_length == 0
    assert all(layer.stats()["quantized_bytes"] > 0 for layer in cross.layers)
    assert cross.get_stats()["compression_ratio"] > 2
    span = reference.amax(-1) - reference.amin(-1)
    assert ((logits - reference).abs().amax(-1) / span).max() <= 0.05


def test_a_bare_cache_on_an_encoder_decoder_model_is_refused_with_the_recipe():
    model = build_model("t5")
    with pytest.raises(ValueError, match=r"as its whole cache.*quantized_encoder_decoder_cache\(model.config"):
        model.generate(**encoder_inputs(model), max_new_tokens=3, past_key_values=QuantizedKVCache(model.config, "int8"))
    with pytest.raises(ValueError, match="needs an encoder-decoder model's config"):
        quantized_encoder_decoder_cache(LlamaConfig(num_hidden_layers=1), "int8")


def test_the_default_cross_attention_cache_is_dynamic_and_generate_matches():
    model = build_model("whisper")
    cache = quantized_encoder_decoder_cache(model.config, "int8", group_size=8, residual_length=8)
    assert type(cache.cross_attention_cache) is DynamicCache
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    out = model.generate(**encoder_inputs(model), past_key_values=cache, **kwargs)
    ref = model.generate(**encoder_inputs(model), **kwargs)
    assert torch.equal(out, ref)


def _llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def test_layer_keys_and_values_are_the_dequantized_history():
    layer = QuantizedKVLayer(key_bits=4, value_bits=4, group_size=4, residual_length=4)
    assert layer.keys is None and layer.values is None
    generator = torch.Generator().manual_seed(0)
    for n in (10, 1, 1, 7):
        layer.update(torch.randn(1, 2, n, 8, generator=generator), torch.randn(1, 2, n, 8, generator=generator))
    keys, values = layer.dequantized()
    assert layer.keys.shape == (1, 2, 19, 8) and torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    with pytest.raises(AttributeError, match="`keys` is read-only"):
        layer.keys = keys


def test_offloading_is_accepted_and_generates_the_same_tokens():
    """On the CPU there is nothing to move (DynamicCache(offloading=True) needs CUDA streams there, and fails);
    the moves themselves run on CUDA only, which this machine lacks."""
    model = _llama()
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(1))
    kwargs = dict(do_sample=False, max_new_tokens=8, attention_mask=torch.ones_like(ids))
    options = dict(group_size=8, residual_length=8)
    offloaded = QuantizedKVCache(model.config, "int4", offloading=True, **options)
    assert offloaded.offloading and not offloaded.uses_fused_attention
    out = model.generate(ids, past_key_values=offloaded, **kwargs)
    ref = model.generate(ids, past_key_values=QuantizedKVCache(model.config, "int4", **options), **kwargs)
    assert torch.equal(out, ref)
    # what DynamicCache(offloading=True) exposes, so code that checks it reads the same
    dynamic = DynamicCache(config=model.config, offloading=True)
    assert (offloaded.offloading, offloaded.only_non_sliding) == (dynamic.offloading, dynamic.only_non_sliding)


@pytest.mark.parametrize("quant_type", ["int8", "int4"])
def test_t5_under_kvquant_sdpa_decodes_as_on_sdpa(quant_type):
    """T5 builds its relative position bias from the length of the keys the cache returns; a fused step returns
    this step's keys alone, so the bias came out for one key and was added to the whole history (logit error 1.9%
    at INT8, 2.5% at INT4, against 0.03% / 0.69% on SDPA). Its decode steps now take the whole history."""
    sdpa = build_model("t5")
    sequence = greedy_sequence(sdpa, dynamic_cache(sdpa))
    want = teacher_forced_logits(sdpa, sequence, make_cache(sdpa, quant_type))
    fused = build_model("t5")
    enable_quantized_attention(fused)
    cache = make_cache(fused, quant_type)
    assert not cache.self_attention_cache.uses_fused_attention
    torch.testing.assert_close(teacher_forced_logits(fused, sequence, cache), want, rtol=0, atol=1e-5)


def test_a_position_bias_built_for_fewer_keys_than_the_history_is_refused():
    layer = QuantizedKVLayer(key_bits=8, value_bits=8, group_size=4, residual_length=4)
    generator = torch.Generator().manual_seed(0)
    layer.update(torch.randn(1, 2, 12, 8, generator=generator), torch.randn(1, 2, 12, 8, generator=generator))
    key, value = torch.randn(1, 2, 1, 8, generator=generator), torch.randn(1, 2, 1, 8, generator=generator)
    layer.append(key, value, defer_flush=True)
    step = FusedStep(history=layer, finish=layer.flush_deferred)
    query = torch.randn(1, 2, 1, 8, generator=generator)
    with pytest.raises(RuntimeError, match="built its position bias for 1 key.* history holds 13"):
        quantized_attention_forward(torch.nn.Module(), query, key, value, None, scaling=1.0,
                                    position_bias=torch.zeros(1, 2, 1, 1), **{FUSED_STEP_KEY: step})
