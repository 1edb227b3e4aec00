"""QuantizedSlidingWindowLayer against DynamicSlidingWindowLayer: the same window shown to attention, fewer bytes."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM
from transformers.cache_utils import DynamicSlidingWindowLayer

from hf_kvcache_plugin import CacheConfig, PrefixStore, QuantizedKVCache, attach_prefix_cache
from hf_kvcache_plugin.budget import layer_nbytes
from hf_kvcache_plugin.attention import FUSED_STEP_KEY, FusedStep, dispatch
from hf_kvcache_plugin.attention.dispatch import quantized_attention_forward
from hf_kvcache_plugin.sliding_layer import QuantizedSlidingWindowLayer
from hf_kvcache_plugin.snapshot_file import SnapshotError, read_snapshot, write_snapshot

B, H, D = 1, 2, 8
WINDOW, GROUP = 20, 4


def _layer(bits: int = 8, residual_length: int = 4, **options) -> QuantizedSlidingWindowLayer:
    return QuantizedSlidingWindowLayer(
        sliding_window=WINDOW, key_bits=bits, value_bits=bits, group_size=GROUP, residual_length=residual_length,
        **options,
    )


def _chunks(generator: torch.Generator):
    # a prefill longer than the window, then single tokens, then a chunk (as speculative steps feed)
    for n in (27, *[1] * 14, 5, *[1] * 6):
        yield torch.randn(B, H, n, D, generator=generator), torch.randn(B, H, n, D, generator=generator)


@pytest.mark.parametrize("residual_length", [4, 24])
def test_attention_sees_the_window_dynamic_sliding_window_layer_shows(residual_length):
    """Same shapes, mask sizes and lengths at every step; the values agree to INT8 rounding, and exactly when the
    window fits in the exact residual window."""
    ours, ref = _layer(residual_length=residual_length), DynamicSlidingWindowLayer(sliding_window=WINDOW)
    for k, v in _chunks(torch.Generator().manual_seed(0)):
        n = k.shape[-2]
        assert ours.get_mask_sizes(n) == ref.get_mask_sizes(n)
        got_k, got_v = ours.update(k, v)
        want_k, want_v = ref.update(k, v)
        assert got_k.shape == want_k.shape and got_v.shape == want_v.shape
        tolerance = 0 if residual_length >= WINDOW else 0.05
        torch.testing.assert_close(got_k, want_k, atol=tolerance, rtol=0)
        torch.testing.assert_close(got_v, want_v, atol=tolerance, rtol=0)
        assert ours.get_seq_length() == ref.get_seq_length()
        assert ours.keys.shape == ref.keys.shape  # the history, as DynamicSlidingWindowLayer keeps it
        torch.testing.assert_close(ours.values, ref.values, atol=tolerance, rtol=0)
        # held: the window and at most one block straddling its start; never more
        assert ours.get_seq_length() - ours._dropped <= WINDOW - 1 + GROUP - 1 + max(0, residual_length - WINDOW + 1)


def test_blocks_leave_the_window_and_the_bytes_are_predicted_exactly():
    ours = _layer()
    ref = DynamicSlidingWindowLayer(sliding_window=WINDOW)
    for k, v in _chunks(torch.Generator().manual_seed(1)):
        predicted = ours.nbytes_after_append(k, v)
        ours.update(k, v)
        ref.update(k, v)
        assert ours.nbytes == predicted
    stats = ours.stats()
    assert stats["quantized_bytes"] > 0 and ours._dropped > 0
    # against what DynamicSlidingWindowLayer holds: the window's last WINDOW - 1 tokens in full precision
    assert stats["fp_bytes"] == layer_nbytes(ref) == ref.keys.nbytes + ref.values.nbytes
    assert stats["fp_bytes"] > ours.nbytes


def test_crop_within_the_held_tokens_and_refused_beyond():
    ours, ref = _layer(), DynamicSlidingWindowLayer(sliding_window=WINDOW)
    ref.activate_past_recording()  # DynamicSlidingWindowLayer needs this to crop at all past the window
    for k, v in list(_chunks(torch.Generator().manual_seed(2)))[:3]:
        ours.update(k, v)
        ref.update(k, v)
    extra = ours.get_seq_length() - ours._dropped - (WINDOW - 1)  # tokens held beyond the window
    assert extra > 0
    ours.crop(-extra)
    ref.crop(-extra)
    assert ours.get_seq_length() == ref.get_seq_length()
    with pytest.raises(RuntimeError, match="sliding-window layer holds the last"):
        ours.crop(-1)


def _sliding_mask(seen: int, n: int, visible: int) -> torch.Tensor:
    """The model's mask over the window: query i at position seen - n + i, key j at seen - visible + j."""
    q_pos = torch.arange(seen - n, seen)[:, None]
    k_pos = torch.arange(seen - visible, seen)[None, :]
    return ((k_pos <= q_pos) & (q_pos - k_pos < WINDOW))[None, None]


@pytest.mark.parametrize("case", ["mask", "no mask", "fallback"])
def test_fused_attention_reads_the_window_and_masks_the_tokens_held_before_it(case):
    """kvquant_sdpa over the packed blocks equals SDPA over the dequantized window, at every step: the tokens the
    layer holds before the window (a block straddling its start) are left out; so does its dequantizing fallback
    (attention weights asked for)."""
    layer = _layer(bits=4)
    generator = torch.Generator().manual_seed(8)
    layer.update(torch.randn(B, H, 27, D, generator=generator), torch.randn(B, H, 27, D, generator=generator))
    hidden_seen = set()
    for n in (1, 1, 1, 1, 1, 3, 1, 1, 1, 1, 2, 1):
        k, v = torch.randn(B, H, n, D, generator=generator), torch.randn(B, H, n, D, generator=generator)
        query = torch.randn(B, 2 * H, n, D, generator=generator)  # two query heads per KV head
        layer.append(k, v, defer_flush=True)
        seen = layer.get_seq_length()
        visible = min(seen - n, WINDOW - 1) + n  # what DynamicSlidingWindowLayer shows this step
        keys, values = layer._materialize()  # every token held, dequantized
        hidden_seen.add(keys.shape[2] - visible)
        assert layer.attention_window(n) == (keys.shape[2] - visible, visible)
        torch.testing.assert_close(layer.window_dequantized(n), (keys[:, :, -visible:], values[:, :, -visible:]))
        keys, values = keys[:, :, -visible:], values[:, :, -visible:]
        mask = _sliding_mask(seen, n, visible)
        want = torch.nn.functional.scaled_dot_product_attention(
            query, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1), attn_mask=mask, scale=0.3
        ).transpose(1, 2)
        module = torch.nn.Module()
        module.sliding_window = WINDOW
        step = FusedStep(history=layer, finish=layer.flush_deferred, cpu_kernel=False)
        got, weights = quantized_attention_forward(
            module, query, k, v, None if case == "no mask" and n == 1 else mask, scaling=0.3, sliding_window=WINDOW,
            output_attentions=case == "fallback", **{FUSED_STEP_KEY: step},
        )
        assert (weights is not None) == (case == "fallback")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not layer.flush_pending
    assert max(hidden_seen) > 0 and 0 in hidden_seen


def test_mistral_fused_generates_as_dequantized_with_a_left_padded_batch():
    model = _tiny_mistral()
    ids = torch.randint(3, 96, (2, 30), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # the second row is 25 tokens, left-padded
    kwargs = dict(do_sample=False, max_new_tokens=14, min_new_tokens=14, attention_mask=mask, pad_token_id=0)
    options = dict(group_size=GROUP, residual_length=4)
    plain = model.generate(ids, past_key_values=QuantizedKVCache(model.config, "int8", attention="dequantize",
                                                                 **options), **kwargs)
    calls = []
    original = dispatch.attention_from_layer
    cache = QuantizedKVCache(model.config, "int8", **options)
    assert cache.uses_fused_attention
    with mock.patch.object(dispatch, "attention_from_layer", lambda *a, **k: calls.append(1) or original(*a, **k)):
        fused = model.generate(ids, past_key_values=cache, **kwargs)
    model.set_attn_implementation("sdpa")
    assert len(calls) == 2 * 13  # every decode step of both (sliding) layers read the packed blocks
    assert torch.equal(fused, plain)


def _tiny_mistral() -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=WINDOW, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


def test_mistral_generates_as_with_dynamic_cache_and_every_layer_is_quantized():
    model = _tiny_mistral()
    config = model.config
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(3))
    kwargs = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12, attention_mask=torch.ones_like(ids))
    cache = QuantizedKVCache(config, "int8", group_size=GROUP, residual_length=4)
    out = model.generate(ids, past_key_values=cache, **kwargs)
    ref = model.generate(ids, past_key_values=DynamicCache(config=config), **kwargs)
    assert torch.equal(out, ref)  # INT8 on a 2-layer model: no near-tie within 12 tokens for this seed
    assert all(type(layer) is QuantizedSlidingWindowLayer for layer in cache.layers)
    assert all(layer.stats()["quantized_bytes"] > 0 for layer in cache.layers)
    assert cache.get_stats()["compression_ratio"] > 1.3
    # prefix reuse exports and loads whole blocks of a full history: not a window's
    with pytest.raises(ValueError, match="layer 0 of this model is cached as a QuantizedSlidingWindowLayer; .* "
                       f"keeps only the last {WINDOW - 1} tokens"):
        attach_prefix_cache(model, PrefixStore(max_size_mb=1, chunk_size=16),
                            CacheConfig(quant_type="int8", group_size=GROUP, residual_length=16))
    with pytest.raises(ValueError, match="quantized full-attention layers only"):
        QuantizedKVCache(config, "int8").load_blocks([None] * 2, [None] * 2, torch.float32, "cpu")


@pytest.mark.parametrize("quant_type", ["int4", "mixed"])
def test_a_snapshot_of_sliding_layers_round_trips_exactly(tmp_path, quant_type):
    """Saved after the window has moved (blocks and residual tokens dropped from the front), loaded: the same
    bytes, the same counters, and bit-identical next-token logits and continuations."""
    model = _tiny_mistral()
    ids = torch.randint(3, 96, (1, 45), generator=torch.Generator().manual_seed(5))
    options = dict(group_size=GROUP, residual_length=4, **({"mixed_int8_tokens": 8} if quant_type == "mixed" else {}))
    cache = QuantizedKVCache(model.config, quant_type, **options)
    with torch.no_grad():
        model(ids[:, :40], past_key_values=cache)
        for t in range(40, 44):  # decode steps move the window's front
            model(ids[:, t : t + 1], past_key_values=cache)
    assert all(layer.window_dropped_tokens > 0 and layer.quantized_keys.num_blocks > 0 for layer in cache.layers)
    size = cache.save(tmp_path / "sliding.kvq")
    assert size > 0
    loaded = QuantizedKVCache.load(tmp_path / "sliding.kvq", model.config)
    assert all(type(layer) is QuantizedSlidingWindowLayer for layer in loaded.layers)
    assert loaded.get_stats() == cache.get_stats()
    for a, b in zip(cache.layers, loaded.layers):
        assert (a.sliding_window, a.window_dropped_tokens, a.get_seq_length(), a.nbytes) == (
            b.sliding_window, b.window_dropped_tokens, b.get_seq_length(), b.nbytes)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert a.get_mask_sizes(1) == b.get_mask_sizes(1)
    with torch.no_grad():
        want = model(ids[:, 44:], past_key_values=cache).logits
        got = model(ids[:, 44:], past_key_values=loaded).logits
    assert torch.equal(got, want)
    kwargs = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert torch.equal(model.generate(ids, past_key_values=loaded, **kwargs),
                       model.generate(ids, past_key_values=cache, **kwargs))


def test_a_sliding_snapshot_does_not_load_into_a_full_attention_model(tmp_path):
    model = _tiny_mistral()
    cache = QuantizedKVCache(model.config, "int8", group_size=GROUP, residual_length=4)
    with torch.no_grad():
        model(torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(6)), past_key_values=cache)
    cache.save(tmp_path / "s.kvq")
    full = MistralConfig(**{**model.config.to_dict(), "sliding_window": None})
    with pytest.raises(SnapshotError, match=r"layer 0 was saved as \('quantized_sliding', 2, 8, 8, 8, 20\)"):
        QuantizedKVCache.load(tmp_path / "s.kvq", full)
    wider = MistralConfig(**{**model.config.to_dict(), "sliding_window": 2 * WINDOW})
    with pytest.raises(SnapshotError, match="from another model or setting"):
        QuantizedKVCache.load(tmp_path / "s.kvq", wider)


@pytest.mark.parametrize("field, value, message", [
    ("window_dropped_tokens", -3, "`window_dropped_tokens` has to be an integer >= 0 but got -3"),
    ("sliding_window", 0, "`sliding_window` has to be a positive integer but got 0"),
])
def test_a_crafted_sliding_layer_state_is_refused(tmp_path, field, value, message):
    model = _tiny_mistral()
    cache = QuantizedKVCache(model.config, "int8", group_size=GROUP, residual_length=4)
    with torch.no_grad():
        model(torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(7)), past_key_values=cache)
    cache.save(tmp_path / "s.kvq")
    state, meta = read_snapshot(tmp_path / "s.kvq", "QuantizedKVCache")
    state["layers"][1][field] = value
    write_snapshot(tmp_path / "crafted.kvq", "QuantizedKVCache", state, meta)  # a valid checksum
    with pytest.raises(SnapshotError, match=f"layer 1: {message}"):
        QuantizedKVCache.load(tmp_path / "crafted.kvq")


def test_drop_first_blocks_across_both_tiers_and_an_exact_block():
    from hf_kvcache_plugin.config import CacheConfig
    from hf_kvcache_plugin.layer import LayerSettings

    config = CacheConfig(quant_type="mixed", group_size=4, residual_length=0, mixed_int8_tokens=8).for_model(1, 8)
    blocks = LayerSettings.for_layer(config, 0).blocks("keys")
    tokens = torch.randn(1, 2, 24, 8, generator=torch.Generator().manual_seed(4))
    tokens[0, 0, 21] = float("nan")  # block 5 (in the recent tier) cannot be quantized: kept exact
    blocks.append(tokens)
    full = blocks.dequantize(torch.float32)
    assert [t.shape[2] for t in blocks.tiers] == [4, 2] and list(blocks.full_precision_blocks) == [5]
    blocks.drop_oldest(5)  # the aged tier whole and one recent block
    assert blocks.num_blocks == 1 and blocks.aged is None and list(blocks.full_precision_blocks) == [0]
    torch.testing.assert_close(blocks.dequantize(torch.float32), full[:, :, 20:], equal_nan=True)
    with pytest.raises(ValueError, match="cannot drop 2 blocks from 1"):
        blocks.drop_oldest(2)
