"""QuantizedKVCache mechanics against a plain full-precision reference, exact byte accounting,
and every Cache operation on the quantized part and the residual alike."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from hf_kvcache_plugin import QuantizedKVCache, create_quantized_kv_cache
from hf_kvcache_plugin.quantization import sqnr_db
from hf_kvcache_plugin.reuse.chunk_codec import encode_blocks

B, H, D = 2, 4, 16


def kv(tokens: int, batch: int = B, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, H, tokens, D, generator=g).to(dtype)
    v = torch.randn(batch, H, tokens, D, generator=g).to(dtype)
    return k, v


def make(quant_type="int4", layers=1, **options):
    options.setdefault("group_size", 8)
    options.setdefault("residual_length", 16)
    return create_quantized_kv_cache(quant_type, num_layers=layers, num_heads=H, head_dim=D, **options)


def fill(cache, k, v, steps=(20, 1, 1, 5, 1), layer=0):
    """Prefill then decode-like updates; returns the full reference K/V and the last outputs."""
    start, out = 0, None
    for n in steps:
        out = cache.update(k[:, :, start : start + n], v[:, :, start : start + n], layer)
        start += n
    return k[:, :, :start], v[:, :, :start], out


def expected_quantized_bytes(tokens, bits, group, scale_bytes=2, batch=B):
    """Bytes of `tokens` quantized tokens per stream pair, KIVI layout, asymmetric."""
    blocks = tokens // group
    key = batch * H * blocks * (D * group * bits // 8 + 2 * D * scale_bytes)  # per channel: scale+zero
    value = batch * H * blocks * (group * D * bits // 8 + 2 * group * (D // group) * scale_bytes)  # per token
    return key + value


def test_prefill_returns_exact_inputs():
    cache = make()
    k, v = kv(40)
    ko, vo = cache.update(k, v, 0)
    assert torch.equal(ko, k) and torch.equal(vo, v)
    assert cache.get_seq_length() == 40


@pytest.mark.parametrize("quant_type,min_db", [("int8", 38.0), ("int4", 15.0), ("int2", 3.5), ("mixed", 38.0)])
def test_decode_returns_history_within_sqnr_and_exact_residual(quant_type, min_db):
    cache = make(quant_type, mixed_int8_tokens=64)
    k, v = kv(60)
    kr, vr, (ko, vo) = fill(cache, k, v, steps=(40, 1, 1, 1, 17))
    layer = cache.layers[0]
    assert ko.shape == kr.shape and vo.shape == vr.shape
    q = layer.quantized_keys.num_tokens
    # the residual window (at least residual_length newest tokens) comes back bit-exact
    assert layer.residual_keys.shape[-2] >= 16
    assert torch.equal(ko[:, :, q:], kr[:, :, q:]) and torch.equal(vo[:, :, q:], vr[:, :, q:])
    assert sqnr_db(kr[:, :, :q], ko[:, :, :q]) > min_db
    assert sqnr_db(vr[:, :, :q], vo[:, :, :q]) > min_db


def test_residual_window_and_block_flush():
    cache = make(group_size=8, residual_length=16)
    layer = cache.layers[0]
    k, v = kv(64)
    cache.update(k[:, :, :23], v[:, :, :23], 0)  # 23 = 16 + 7 < 16 + 8: nothing quantized
    assert layer.quantized_keys.num_tokens == 0 and layer.residual_keys.shape[-2] == 23
    cache.update(k[:, :, 23:24], v[:, :, 23:24], 0)  # 24 = 16 + 8: one block leaves the window
    assert layer.quantized_keys.num_tokens == 8 and layer.residual_keys.shape[-2] == 16
    cache.update(k[:, :, 24:64], v[:, :, 24:64], 0)  # 56 in the window: 5 blocks leave at once
    assert layer.quantized_keys.num_tokens == 48 and layer.residual_keys.shape[-2] == 16


def test_flush_residual_quantizes_every_whole_block_now():
    """`flush_residual` gives the layout a prefix-store hit loads: whole blocks out, the same bytes
    `encode_blocks` makes from the same exact K/V; the window's length setting is kept."""
    cache = make("int8", group_size=8, residual_length=16)
    cache.flush_residual()  # nothing held yet: a no-op
    layer = cache.layers[0]
    k, v = kv(64)
    cache.update(k[:, :, :42], v[:, :, :42], 0)
    assert (layer.quantized_keys.num_tokens, layer.residual_keys.shape[-2]) == (24, 18)
    cache.flush_residual()
    assert (layer.quantized_keys.num_tokens, layer.residual_keys.shape[-2]) == (40, 2)
    assert layer.residual_length == 16 and layer.get_seq_length() == 42
    qk, qv = encode_blocks(layer, k[:, :, :40], v[:, :, :40])
    for held, made in ((layer.quantized_keys.recent, qk), (layer.quantized_values.recent, qv)):
        assert torch.equal(held.data, made.data) and torch.equal(held.scale, made.scale)
        assert torch.equal(held.zero, made.zero)
    ko, _ = cache.update(k[:, :, 42:43], v[:, :, 42:43], 0)  # the window fills up again as usual
    assert ko.shape[-2] == 43 and torch.equal(ko[:, :, 40:], k[:, :, 40:43])
    assert layer.quantized_keys.num_tokens == 40


def test_history_is_never_requantized():
    cache = make("int4")
    layer = cache.layers[0]
    k, v = kv(200)
    cache.update(k[:, :, :40], v[:, :, :40], 0)
    first = layer.quantized_keys.recent
    snapshot = (first.data.clone(), first.scale.clone(), first.zero.clone())
    n_first = first.shape[2]
    for t in range(40, 200):
        cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], 0)
    now = layer.quantized_keys.recent
    assert torch.equal(now.data[:, :, :n_first], snapshot[0])
    assert torch.equal(now.scale[:, :, :n_first], snapshot[1])
    assert torch.equal(now.zero[:, :, :n_first], snapshot[2])


def test_decode_writes_the_window_in_place_and_counts_its_capacity():
    """A decode step writes its token into the window's buffers (no copy of the window per token); the
    buffers, residual_length + G tokens, count whole; the history read back is exact."""
    cache = make("int4")  # G 8, residual 16: capacity 24 tokens
    layer = cache.layers[0]
    k, v = kv(120)
    cache.update(k[:, :, :37], v[:, :, :37], 0)
    per_token_fp = 2 * B * H * D * 4
    assert cache.get_stats()["residual_bytes"] == layer.residual_keys.shape[-2] * per_token_fp  # the prompt: tight
    buffer = None
    for t in range(37, 120):
        ko, vo = cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], 0)
        window = layer.residual_keys.shape[-2]
        assert torch.equal(ko[:, :, -window:], k[:, :, t + 1 - window : t + 1])
        if buffer is None:
            buffer = layer.residual_keys.untyped_storage().data_ptr()
        assert layer.residual_keys.untyped_storage().data_ptr() == buffer  # the same buffer every step
        assert cache.get_stats()["residual_bytes"] == 24 * per_token_fp
        held = layer.quantized_keys.num_tokens
        assert held + layer.residual_keys.shape[-2] == t + 1 and 16 <= layer.residual_keys.shape[-2] < 24
    # quantized history equal to quantizing the same tokens in one go, then the exact window
    qk, _ = encode_blocks(layer, k[:, :, :held], v[:, :, :held])
    assert torch.equal(layer.quantized_keys.recent.data, qk.data)
    assert torch.equal(layer.residual_keys, k[:, :, held:120])
    # a crop or a batch selection leaves a tight window again
    cache.crop(-3)
    assert cache.get_stats()["residual_bytes"] == layer.residual_keys.shape[-2] * per_token_fp


@pytest.mark.parametrize("bits,quant_type", [(8, "int8"), (4, "int4"), (2, "int2")])
@pytest.mark.parametrize("tokens", [24, 100, 257])
def test_exact_byte_accounting(bits, quant_type, tokens):
    cache = make(quant_type, layers=2, sink_tokens=3)
    k, v = kv(tokens)
    for layer in range(2):
        cache.update(k, v, layer)
    stats = cache.get_stats()
    quantized_tokens = ((tokens - 3 - 16) // 8) * 8
    residual_tokens = tokens - 3 - quantized_tokens
    per_token_fp = 2 * B * H * D * 4  # K and V, fp32
    assert stats["quantized_bytes"] == 2 * expected_quantized_bytes(quantized_tokens, bits, 8)
    assert stats["residual_bytes"] == 2 * residual_tokens * per_token_fp
    assert stats["sink_bytes"] == 2 * 3 * per_token_fp
    assert stats["total_bytes"] == stats["quantized_bytes"] + stats["residual_bytes"] + stats["sink_bytes"]
    assert stats["fp_bytes"] == 2 * tokens * per_token_fp
    assert stats["compression_ratio"] == pytest.approx(stats["fp_bytes"] / stats["total_bytes"])
    assert stats["seq_length"] == tokens


def test_fp_bytes_match_a_dynamic_cache_and_bf16_compression():
    k, v = kv(1024, dtype=torch.bfloat16)
    dyn = DynamicCache()
    dyn.update(k, v, 0)
    cache = make("int4", group_size=16, residual_length=32)
    cache.update(k, v, 0)
    stats = cache.get_stats()
    assert stats["fp_bytes"] == dyn.layers[0].keys.nbytes + dyn.layers[0].values.nbytes
    # int4 + fp16 scale/zero per 16 elements = 6 bits/elem; plus 32 fp tokens of 1024
    expected = (1024 - 32) / 1024 * 6 / 16 + 32 / 1024
    assert stats["total_bytes"] / stats["fp_bytes"] == pytest.approx(expected, rel=1e-9)


def test_sinks_stay_exact():
    cache = make("int2", sink_tokens=4)
    k, v = kv(80)
    _, _, (ko, vo) = fill(cache, k, v, steps=(50, 1, 29))
    assert torch.equal(ko[:, :, :4], k[:, :, :4]) and torch.equal(vo[:, :, :4], v[:, :, :4])


def test_sinks_filled_across_updates():
    cache = make("int4", sink_tokens=5)
    k, v = kv(40)
    fill(cache, k, v, steps=(2, 1, 1, 36))
    layer = cache.layers[0]
    assert torch.equal(layer.sink_keys, k[:, :, :5])
    assert layer.quantized_keys.num_tokens + layer.residual_keys.shape[-2] == 35


def test_mixed_repacks_aged_blocks_once_to_int4():
    cache = make("mixed", mixed_int8_tokens=16)
    layer = cache.layers[0]
    k, v = kv(120)
    fill(cache, k, v, steps=(60, 1, 1, 58))
    qk = layer.quantized_keys
    assert qk.recent.bits == 8 and qk.recent.shape[2] == 2  # the newest 16 tokens in INT8
    assert qk.aged.bits == 4 and qk.num_tokens == 104  # everything older in INT4
    int4 = make("int4")
    int8 = make("int8")
    for c in (int4, int8):
        fill(c, k, v, steps=(60, 1, 1, 58))
    assert int4.get_stats()["total_bytes"] < cache.get_stats()["total_bytes"] < int8.get_stats()["total_bytes"]


def test_layer_overrides_and_skip_layers():
    cache = make("int4", layers=3, layer_overrides={1: {"key_bits": 8, "value_bits": 2}}, skip_layers=[2])
    assert cache.layers[1].key_bits == 8 and cache.layers[1].value_bits == 2
    assert type(cache.layers[2]).__name__ == "DynamicLayer"
    k, v = kv(50)
    for i in range(3):
        cache.update(k, v, i)
    ko, vo = cache.retrieve(2)
    assert torch.equal(ko, k)
    stats = cache.get_stats()
    assert stats["fp_bytes"] == 3 * 2 * k.nbytes
    assert stats["residual_bytes"] >= 2 * k.nbytes  # the skipped layer holds everything in fp


@pytest.mark.parametrize("remove", [1, 10, 20, 35, 47])
@pytest.mark.parametrize("sinks", [0, 4])
def test_crop_inside_blocks_matches_a_cache_that_never_saw_the_tokens(remove, sinks):
    k, v = kv(64)
    cache = make("int8", sink_tokens=sinks)
    cache.update(k[:, :, :50], v[:, :, :50], 0)
    cache.crop(-remove)
    assert cache.get_seq_length() == 50 - remove
    assert cache.get_mask_sizes(3, 0) == (50 - remove + 3, 0)
    ko, vo = cache.update(k[:, :, 50 - remove : 52 - remove], v[:, :, 50 - remove : 52 - remove], 0)
    assert ko.shape[-2] == 52 - remove
    # every surviving token is its original up to int8 error; the new ones are exact
    assert sqnr_db(k[:, :, : 52 - remove], ko) > 38
    assert torch.equal(ko[:, :, -2:], k[:, :, 50 - remove : 52 - remove])


def test_crop_errors():
    cache = make()
    k, v = kv(10)
    cache.update(k, v, 0)
    with pytest.raises(ValueError, match="negative integer"):
        cache.crop(3)
    with pytest.raises(ValueError, match="cannot crop 11 tokens, the cache holds only 10"):
        cache.crop(-11)
    cache.crop(0)
    assert cache.get_seq_length() == 10


def _state(cache):
    return [t.clone() for t in cache.retrieve(0)]


def test_reorder_cache_selects_beams_in_quantized_and_residual_parts():
    k, v = kv(60, batch=3)
    cache = make()
    cache.update(k, v, 0)
    before = _state(cache)
    beam_idx = torch.tensor([2, 2, 0])
    cache.reorder_cache(beam_idx)
    after = _state(cache)
    assert torch.equal(after[0], before[0][beam_idx]) and torch.equal(after[1], before[1][beam_idx])
    ko, _ = cache.update(*kv(1, batch=3, seed=5), 0)
    assert ko.shape == (3, H, 61, D)


def test_batch_select_and_repeat_interleave():
    k, v = kv(60, batch=3)
    cache = make()
    cache.update(k, v, 0)
    before = _state(cache)
    cache.batch_repeat_interleave(2)
    assert torch.equal(_state(cache)[0], before[0].repeat_interleave(2, dim=0))
    cache.batch_select_indices(torch.tensor([1, 4]))
    assert torch.equal(_state(cache)[1], before[1][[0, 2]])
    assert cache.layers[0].batch_size == 2
    ko, _ = cache.update(*kv(1, batch=2, seed=3), 0)
    assert ko.shape[0] == 2


def test_reset_offload_prefetch_deepcopy_save_load():
    k, v = kv(60)
    cache = make("mixed", mixed_int8_tokens=16, sink_tokens=2)
    cache.update(k, v, 0)
    before = _state(cache)

    clone = copy.deepcopy(cache)
    assert torch.equal(_state(clone)[0], before[0])
    clone.update(*kv(1, seed=9), 0)
    assert cache.get_seq_length() == 60 and clone.get_seq_length() == 61  # independent

    buf = io.BytesIO()
    torch.save(cache, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(_state(loaded)[1], before[1])
    assert loaded.get_stats() == cache.get_stats()

    cache.layers[0].offload()
    assert cache.layers[0].residual_keys.device.type == "cpu"
    cache.layers[0].prefetch()
    assert torch.equal(_state(cache)[0], before[0])

    cache.reset()
    assert cache.get_seq_length() == 0 and cache.get_stats()["total_bytes"] == 0
    ko, _ = cache.update(k[:, :, :5], v[:, :, :5], 0)
    assert torch.equal(ko, k[:, :, :5])


@pytest.mark.parametrize(
    "k_shape,dtype,message",
    [
        ((B, H, 4), torch.float32, "4-d tensor"),
        ((B, H + 1, 4, D), torch.float32, "5 heads but the model config has 4"),
        ((B, H, 4, D + 8), torch.float32, "head_dim 24 but the model config has head_dim 16"),
        ((B, H, 4, D), torch.int64, "floating point"),
    ],
)
def test_bad_tensors_are_refused_with_the_layer_named(k_shape, dtype, message):
    cache = make()
    k = torch.zeros(k_shape, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        cache.update(k, k, 0)


def test_mismatch_after_initialisation():
    cache = make()
    cache.update(*kv(4), 0)
    with pytest.raises(ValueError, match="layer 0: got key/value states with"):
        cache.update(*kv(4, batch=B + 1), 0)
    with pytest.raises(ValueError, match="dtype torch.bfloat16"):
        cache.update(*kv(4, dtype=torch.bfloat16), 0)


def test_layer_index_out_of_range():
    cache = make(layers=2)
    with pytest.raises(ValueError, match=r"`layer_idx` has to be in \[0, 1\] but got 2"):
        cache.update(*kv(4), 2)
    with pytest.raises(ValueError, match=r"`layer_id` has to be in \[0, 1\] but got -1"):
        cache.retrieve(-1)  # named as `retrieve` names it


def test_seed_compatible_store_and_retrieve():
    cache = create_quantized_kv_cache(quant_type="int8", num_layers=2, num_heads=H, head_dim=D)
    k, v = kv(300)
    cache.store(1, k, v)
    ko, vo = cache.retrieve(1)
    assert sqnr_db(k, ko) > 38 and sqnr_db(v, vo) > 38
    stats = cache.get_stats()
    assert {"seq_length", "quantized_bytes", "residual_bytes", "total_bytes", "fp_bytes", "compression_ratio"} <= set(
        stats
    )
    with pytest.raises(ValueError, match="holds no tokens"):
        cache.retrieve(0)


def test_group_size_must_divide_head_dim_for_token_grouping():
    with pytest.raises(ValueError, match=r"`group_size` \(32\) has to divide head_dim \(16\)"):
        create_quantized_kv_cache("int4", num_layers=1, num_heads=H, head_dim=16, group_size=32, residual_length=32)
    # channel grouping for both streams lifts the constraint
    create_quantized_kv_cache(
        "int4", num_layers=1, num_heads=H, head_dim=16, group_size=32, residual_length=32, value_axis="channel"
    )


def test_layer_kinds_sliding_quantized_skipped_exact_linear_kept_with_a_warning(caplog):
    config = LlamaConfig(
        hidden_size=32, num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_hidden_layers=3,
        intermediate_size=64, vocab_size=64,
    )
    config.layer_types = ["full_attention", "sliding_attention", "sliding_attention"]
    config.sliding_window = 32
    cache = QuantizedKVCache(config, "int4", group_size=8, residual_length=8, skip_layers=[2])
    assert [type(layer).__name__ for layer in cache.layers] == [
        "QuantizedKVLayer", "QuantizedSlidingWindowLayer", "DynamicSlidingWindowLayer",
    ]
    assert cache.layers[1].sliding_window == 32 and cache.is_sliding == [False, True, True]
    config.sliding_window = 8  # a window inside the exact residual window compresses nothing: said so
    with caplog.at_level("WARNING", logger="hf_kvcache_plugin.cache"):
        QuantizedKVCache(config, "int4", group_size=8, residual_length=8)
    assert "layer 1's sliding window (8 tokens) fits in `residual_length` (8)" in caplog.text
    config.layer_types = ["full_attention", "linear_attention", "full_attention"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_kvcache_plugin.cache"):
        cache = QuantizedKVCache(config, "int4", group_size=8, residual_length=8)
    assert type(cache.layers[1]).__name__ == "LinearAttentionLayer"
    assert "layer 1 is a `linear_attention` layer, which it cannot quantize" in caplog.text
    assert "no compression" in caplog.text
    config.layer_types = ["full_attention", "no_such_attention", "full_attention"]
    with pytest.raises(ValueError, match="layer 1 is a `no_such_attention` layer"):
        QuantizedKVCache(config, "int4", group_size=8, residual_length=8)


def test_constructor_errors():
    with pytest.raises(ValueError, match="`quant_type` has to be one of"):
        QuantizedKVCache(None, "int3", num_layers=1)
    with pytest.raises(ValueError, match="model `config` or a positive `num_layers`"):
        QuantizedKVCache(None, "int4")
    with pytest.raises(ValueError, match="PretrainedConfig"):
        QuantizedKVCache({"num_hidden_layers": 2}, "int4")
    with pytest.raises(ValueError, match=r"`skip_layers` names layers \[5\] but the model has 2 layers"):
        QuantizedKVCache(None, "int4", num_layers=2, skip_layers=[5])


@pytest.mark.parametrize("quant_type", ["int4", "mixed"])
def test_tiers_are_held_in_bounded_parts_that_read_as_one(monkeypatch, quant_type):
    """A long history is held in parts cut at fixed positions (4 of PART_TOKENS, 4 of twice that, ...): a flush
    copies at most one part (the peak stays close to what is stored), and the parts hold exactly what one tensor
    per tier would (codes, bytes, history)."""
    from hf_kvcache_plugin import block_tensors, blocks

    k, v = kv(300)
    steps = (90, *([1] * 150), 60)
    monkeypatch.setattr(blocks, "PART_TOKENS", 10**9)
    whole = make(quant_type, mixed_int8_tokens=32)
    fill(whole, k, v, steps=steps)

    monkeypatch.setattr(blocks, "PART_TOKENS", 24)  # 3 blocks of 8 tokens per part
    cat_blocks = []
    real_cat = block_tensors.cat_blocks
    monkeypatch.setattr(block_tensors, "cat_blocks", lambda parts: cat_blocks.append(sum(p.shape[2] for p in parts))
                        or real_cat(parts))
    parted = make(quant_type, mixed_int8_tokens=32)
    fill(parted, k, v, steps=steps)

    assert max(cat_blocks) <= 6  # no copy of more than one part, however long the history
    for stream in ("quantized_keys", "quantized_values"):
        a, b = getattr(whole.layers[0], stream), getattr(parted.layers[0], stream)
        sizes = [t.shape[2] for t in b.tiers]
        # 35 blocks of 8 tokens (280 tokens flushed): parts of 3, 3, 3, 3, 6, 6, 6, 6 blocks, then the last one;
        # mixed: the newest 4 blocks (INT8) are a tier of their own, cut at the same positions
        expected = [3, 3, 3, 3, 6, 6, 6, 5] if quant_type == "int4" else [3, 3, 3, 3, 6, 6, 6, 1, 4]
        assert sizes == expected, sizes
        assert b.num_blocks == a.num_blocks and b.nbytes == a.nbytes
        assert torch.equal(b.dequantize(torch.float32), a.dequantize(torch.float32))
        for name in ("recent", "aged"):
            ta, tb = getattr(a, name), getattr(b, name)
            assert (ta is None) == (tb is None)
            if ta is not None:
                assert torch.equal(ta.data, tb.data) and torch.equal(ta.scale, tb.scale)
    assert whole.get_stats()["total_bytes"] == parted.get_stats()["total_bytes"]
    for ka, kb in zip(whole.layers[0].dequantized(), parted.layers[0].dequantized()):
        assert torch.equal(ka, kb)
