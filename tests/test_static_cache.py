"""``StaticQuantizedKVCache``: fixed shapes, so ``generate`` compiles one graph for every decode step.

Its reference is ``QuantizedKVCache``: the same codec on the same tokens, the same boundary between quantized
and exact tokens, so the same codes, the same attention (to float rounding) and the same generated tokens.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import CompileConfig, LlamaForCausalLM, StaticCache
from transformers.cache_utils import StaticLayer

from hf_kvcache_plugin import QuantizedKVCache, StaticQuantizedKVCache
from hf_kvcache_plugin.attention.reference import attention_from_layer
from hf_kvcache_plugin.attention.static_attention import static_attention
from hf_kvcache_plugin.layer import QuantizedKVLayer
from hf_kvcache_plugin.layer_settings import LayerSettings
from hf_kvcache_plugin.static_layer import StaticQuantizedKVLayer

from .conftest import tiny_llama_config

NEW_TOKENS = 80


def _generate(model, prompt, cache, new_tokens=NEW_TOKENS, **kwargs):
    kwargs.setdefault("disable_compile", True)
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=kwargs.pop("attention_mask", torch.ones_like(prompt)),
                             past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                             output_scores=kwargs.pop("output_scores", True), **kwargs)
    return out.sequences[:, prompt.shape[1]:], None if out.scores is None else torch.stack(out.scores)


def _logit_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference over the logits both runs left finite (min_new_tokens sets EOS to -inf)."""
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    finite = torch.isfinite(a)
    return (a[finite] - b[finite]).abs().max().item()


@pytest.fixture(scope="module")
def story(model_and_tokenizer):
    _, tok = model_and_tokenizer
    text = "Once upon a time there was a little girl named Lily. She loved to play in the park with her friends."
    return tok(text, return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------- one layer
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("cpu_kernel", [False, True])
def test_a_layer_stores_the_codes_and_reads_the_attention_of_the_growing_layer(bits, cpu_kernel):
    """Step by step over a prompt and 70 decode steps (several blocks cross the boundary): the blocks hold the
    codes ``QuantizedKVLayer`` holds, bit for bit, and attention over the capacity equals attention over the
    growing layer to float rounding."""
    torch.manual_seed(bits)
    b, h, d, g, r = 2, 2, 16, 8, 16
    settings = LayerSettings(key_bits=bits, value_bits=bits, group_size=g, residual_length=r)
    growing, static = QuantizedKVLayer(settings), StaticQuantizedKVLayer(settings, max_cache_len=100)
    prompt = torch.randn(b, h, 21, d), torch.randn(b, h, 21, d)
    growing.update(*prompt)
    keys, values = static.update(*prompt)
    assert torch.equal(keys[:, :, :21], prompt[0]) and not keys[:, :, 21:].any()  # a prompt reads exact
    worst = 0.0
    for _ in range(70):
        k, v, query = torch.randn(b, h, 1, d), torch.randn(b, h, 1, d), torch.randn(b, 2 * h, 1, d)
        growing.append(k, v, defer_flush=True)
        static.append(k, v)
        expected = attention_from_layer(query, growing, None, 0.25, cpu_kernel=cpu_kernel)
        got = static_attention(query, static, None, 0.25, cpu_kernel=cpu_kernel)
        worst = max(worst, (expected - got).abs().max().item())
        growing.flush_deferred()
    assert worst < 1e-5
    n = growing.quantized_keys.num_blocks
    assert n == (91 - r) // g  # blocks did cross the boundary
    for blocks, held in ((growing.quantized_keys, static.key_blocks), (growing.quantized_values, static.value_blocks)):
        reference = blocks.take_blocks(0, n)
        assert torch.equal(held.data[:, :, :n], reference.data)
        assert torch.equal(held.scale[:, :, :n], reference.scale)
        assert torch.equal(held.zero[:, :, :n], reference.zero)
    dense_keys, dense_values = growing.dequantized()
    static_keys, static_values = static.dense()
    assert torch.allclose(static_keys[:, :, :91], dense_keys, atol=1e-6)
    assert torch.allclose(static_values[:, :, :91], dense_values, atol=1e-6)
    assert not static_keys[:, :, 91:].any()


def test_a_layer_holds_exactly_its_buffers_bytes():
    """Block slots for the capacity plus one scratch slot (codes, fp16 scales and zeros) and the exact ring,
    counted byte for byte: far less than ``StaticLayer``'s dense buffers for the same capacity."""
    b, h, d, g, r, capacity = 1, 4, 64, 64, 128, 4096
    layer = StaticQuantizedKVLayer(LayerSettings(key_bits=4, value_bits=4, group_size=g, residual_length=r),
                                   max_cache_len=capacity)
    layer.update(torch.randn(b, h, 10, d, dtype=torch.bfloat16), torch.randn(b, h, 10, d, dtype=torch.bfloat16))
    slots = (capacity // g + 1) * g
    codes = 2 * b * h * slots * d // 2  # keys and values, two 4-bit codes a byte
    key_meta = 2 * (slots // g) * b * h * d * 2  # scale and zero per block per channel, fp16
    value_meta = 2 * slots * b * h * (d // g) * 2  # scale and zero per token per group of G channels, fp16
    ring = 2 * (r + 2 * g + 64) * b * h * d * 2  # keys and values, bf16
    assert layer.nbytes == codes + key_meta + value_meta + ring
    dense = StaticLayer(capacity)
    dense.update(torch.randn(b, h, 10, d, dtype=torch.bfloat16), torch.randn(b, h, 10, d, dtype=torch.bfloat16))
    dense_bytes = 2 * dense.keys.numel() * dense.keys.element_size()
    assert dense_bytes / layer.nbytes > 2.5  # 2.75: INT4 codes with fp16 metadata, and the exact ring


# ---------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("attention", ["fused", "dequantize"])
def test_generate_gives_the_growing_caches_tokens(model, story, attention):
    """Greedy, 80 tokens, 16 exact tokens: most of the history is quantized, and the tokens are those of
    ``QuantizedKVCache`` with the same settings."""
    model = copy.deepcopy(model)
    model.set_attn_implementation("sdpa")
    options = {"quant_type": "int4", "residual_length": 16, "attention": attention}
    expected, expected_scores = _generate(model, story, QuantizedKVCache(model.config, **options))
    cache = StaticQuantizedKVCache(model.config, max_cache_len=story.shape[1] + NEW_TOKENS, **options)
    got, scores = _generate(model, story, cache)
    assert torch.equal(got, expected)
    assert _logit_gap(scores, expected_scores) < 1e-3
    assert cache.get_stats()["seq_length"] == story.shape[1] + NEW_TOKENS - 1


def test_generate_in_bfloat16_agrees_with_the_growing_cache(model, story):
    model = copy.deepcopy(model).to(torch.bfloat16)
    model.set_attn_implementation("sdpa")
    expected, _ = _generate(model, story, QuantizedKVCache(model.config, "int4", residual_length=16))
    got, _ = _generate(model, story, StaticQuantizedKVCache(model.config, story.shape[1] + NEW_TOKENS, "int4",
                                                            residual_length=16))
    assert (got == expected).float().mean().item() >= 0.95


def test_a_left_padded_batch_gives_the_growing_caches_tokens(model, model_and_tokenizer):
    """Two prompts of different lengths, left-padded: the model's padding mask reaches both halves of the read."""
    _, tok = model_and_tokenizer
    rows = [tok(t).input_ids for t in ("Tom had a red ball.", "The little cat was sad because the rain did not stop")]
    width = max(map(len, rows))
    prompt = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    model = copy.deepcopy(model)
    model.set_attn_implementation("sdpa")
    expected, _ = _generate(model, prompt, QuantizedKVCache(model.config, "int4", residual_length=16),
                            attention_mask=mask)
    got, _ = _generate(model, prompt, StaticQuantizedKVCache(model.config, width + NEW_TOKENS, "int4",
                                                             residual_length=16), attention_mask=mask)
    assert torch.equal(got, expected)


def test_beam_search_reorders_the_static_buffers(model, story):
    model = copy.deepcopy(model)
    model.set_attn_implementation("sdpa")
    kwargs = {"num_beams": 3, "output_scores": False}
    expected, _ = _generate(model, story, QuantizedKVCache(model.config, "int4", residual_length=16), 40, **kwargs)
    got, _ = _generate(model, story, StaticQuantizedKVCache(model.config, story.shape[1] + 40, "int4",
                                                            residual_length=16), 40, **kwargs)
    assert torch.equal(got, expected)


def test_prompt_lookup_decoding_crops_the_static_cache(model, story):
    """Prompt-lookup decoding checks candidates and crops the rejected ones: the output is greedy's."""
    model = copy.deepcopy(model)
    model.set_attn_implementation("sdpa")
    expected, _ = _generate(model, story, StaticQuantizedKVCache(model.config, story.shape[1] + 60, "int4",
                                                                 residual_length=16), 50)
    cache = StaticQuantizedKVCache(model.config, story.shape[1] + 60, "int4", residual_length=16)
    with torch.inference_mode():
        got = model.generate(story, attention_mask=torch.ones_like(story), past_key_values=cache, max_new_tokens=50,
                             min_new_tokens=50, do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=4,
                             disable_compile=True)
    assert torch.equal(got[:, story.shape[1]:], expected)


def test_generate_compiles_the_decode_step_once_as_for_static_cache(model, story):
    """``generate`` compiles the decode step itself (Inductor) for this cache as for ``StaticCache``: no graph
    break, nothing recompiled over 80 steps nor for a second call with a new cache; the tokens are eager's.

    At most one graph more than ``StaticCache`` gets: the first compiled call leaves the ``kernels`` package's
    context variable (its forward wrapper's guard, ``_ACTIVE_KERNEL_FUNCS``) set when the step holds a
    ``torch.cond``, so Dynamo compiles the step once more on the second call, and never again."""
    model = copy.deepcopy(model)
    model.set_attn_implementation("sdpa")
    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True  # generate compiles on CPU only with it
    counters = torch._dynamo.utils.counters

    def compiled_graphs(cache) -> tuple[int, torch.Tensor]:
        before = counters["stats"]["unique_graphs"]
        tokens, _ = _generate(model, story, cache, disable_compile=False, compile_config=compile_config)
        return counters["stats"]["unique_graphs"] - before, tokens

    def cache():
        return StaticQuantizedKVCache(model.config, story.shape[1] + NEW_TOKENS, "int4", residual_length=16)

    assert cache().is_compileable
    expected, expected_scores = _generate(model, story, cache())
    torch._dynamo.reset()
    counters.clear()
    static_graphs, _ = compiled_graphs(StaticCache(config=model.config, max_cache_len=story.shape[1] + NEW_TOKENS))
    torch._dynamo.reset()
    first, got = compiled_graphs(cache())
    again, tokens_again = compiled_graphs(cache())
    assert 1 <= first <= static_graphs + 1 and again == 0
    assert sum(counters["graph_break"].values()) == 0
    assert torch.equal(got, expected) and torch.equal(tokens_again, expected)


# ---------------------------------------------------------------------------------------------- refusals
def test_more_tokens_than_max_cache_len_is_an_error(model, story):
    cache = StaticQuantizedKVCache(model.config, max_cache_len=story.shape[1] + 5, quant_type="int4")
    with pytest.raises(ValueError, match="max_cache_len"):
        _generate(model, story, cache, new_tokens=10)


@pytest.mark.parametrize("options, named", [
    ({"quant_type": "mixed"}, "mixed"),
    ({"quant_type": "int4", "sink_tokens": 4}, "sink tokens"),
    ({"quant_type": "int4", "max_size_mb": 10}, "byte budget"),
])
def test_what_the_static_cache_cannot_do_is_refused_by_name(model, options, named):
    with pytest.raises(ValueError, match=named):
        StaticQuantizedKVCache(model.config, max_cache_len=64, **options)


def test_a_model_with_sliding_window_layers_is_refused():
    config = tiny_llama_config()
    config.layer_types = ["sliding_attention", "full_attention"]
    config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding_attention"):
        StaticQuantizedKVCache(config, max_cache_len=64)


def test_a_crop_past_the_ring_is_refused():
    layer = StaticQuantizedKVLayer(LayerSettings(key_bits=4, value_bits=4, group_size=8, residual_length=16),
                                   max_cache_len=400, croppable_tokens=0)
    layer.update(torch.randn(1, 2, 200, 8), torch.randn(1, 2, 200, 8))
    layer.crop(-8)
    with pytest.raises(ValueError, match="croppable_tokens"):
        layer.crop(-40)
    assert int(layer.get_seq_length()) == 192


def test_a_block_that_cannot_be_quantized_is_counted_and_reported(caplog):
    """Values beyond fp16's scale range: the block reads as zeros (no NaN reaches attention), and the count says
    so."""
    layer = StaticQuantizedKVLayer(LayerSettings(key_bits=4, value_bits=4, group_size=8, residual_length=8),
                                   max_cache_len=64)
    keys = torch.randn(1, 2, 24, 8)
    keys[:, :, 3] = 1e9
    layer.update(keys, torch.randn(1, 2, 24, 8))
    layer.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    out = static_attention(torch.randn(1, 2, 1, 8), layer, None, 0.3)
    assert torch.isfinite(out).all()
    with caplog.at_level(logging.WARNING):
        assert layer.stats()["unquantizable_blocks"] == 1
    assert "could not be quantized" in caplog.text


def test_the_static_cache_is_a_random_models_compileable_cache():
    """Any Llama-shaped decoder: layers per the config, heads checked at the first step."""
    model = LlamaForCausalLM(tiny_llama_config(head_dim=16)).eval()
    cache = StaticQuantizedKVCache(model.config, max_cache_len=32, quant_type="int8")
    assert len(cache.layers) == 2 and cache.is_compileable
    with pytest.raises(ValueError, match="heads"):
        cache.update(torch.randn(1, 3, 4, 16), torch.randn(1, 3, 4, 16), 0)
