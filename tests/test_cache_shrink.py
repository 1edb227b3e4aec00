"""Getting under the byte budget: oldest blocks re-packed 8 -> 4 -> 2 bits, then middle blocks dropped, each step
with exact bytes; the policy; positions after a drop; the sizer driving ``resize``."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_kvcache_plugin import CacheBudgetExceeded, ConfigError, QuantizedKVCache, create_quantized_kv_cache, parse_config
from hf_kvcache_plugin._compat import GENERATE_CACHE_KWARG
from hf_kvcache_plugin.quantization import dequantize, quantize
from hf_kvcache_plugin.reuse.memory import MemoryMonitor, MemoryReading
from hf_kvcache_plugin.reuse.sizer import create_adaptive_sizer

from .conftest import tiny_llama_config

MIB = 2**20
HEADS, DIM, G = 2, 16, 8
GROUPS = HEADS * DIM  # groups per block per stream (batch 1): DIM channels x HEADS, or G channels x DIM/G x HEADS
WINDOW_BYTES = 8 * HEADS * 2 * DIM * 4  # 8 exact float32 tokens, keys and values


def block(bits: int) -> int:
    """Bytes of one block of one stream: codes, then an fp16 scale and zero per group."""
    return GROUPS * G * bits // 8 + GROUPS * 2 * 2


def tokens(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, HEADS, n, DIM, generator=g), torch.randn(1, HEADS, n, DIM, generator=g)


def shrink_to(cache: QuantizedKVCache, budget_mb: float) -> None:
    cache.resize(budget_mb)
    cache.shrink_to_budget()


def filled(policy: str, quant_type: str = "int8", **options) -> QuantizedKVCache:
    """One layer, 72 tokens: 8 blocks quantized, the newest 8 tokens exact."""
    cache = create_quantized_kv_cache(
        quant_type=quant_type, num_layers=1, num_heads=HEADS, head_dim=DIM, group_size=G, residual_length=8,
        budget_policy=policy, **options,
    )  # fmt: skip
    cache.store(0, *tokens(72))
    return cache


def test_each_shrink_step_frees_exact_bytes_oldest_blocks_first():
    cache = filled("repack_then_drop")
    held = 2 * 8 * block(8) + WINDOW_BYTES
    assert cache.get_stats()["total_bytes"] == held
    before = cache.retrieve(0)

    # 8 -> 4 on the 3 oldest blocks: each frees block(8) - block(4) per stream
    shrink_to(cache, (held - 2 * 2 * (block(8) - block(4)) - 1) / MIB)
    held -= 3 * 2 * (block(8) - block(4))
    stats = cache.get_stats()
    assert stats["total_bytes"] == held
    assert stats["budget"]["tokens_at_bits"] == {"keys": {8: 40, 4: 24}, "values": {8: 40, 4: 24}}
    assert stats["budget"]["steps"]["repack_8_to_4"] == {
        "events": 1, "blocks": 6, "bytes_freed": 3 * 2 * (block(8) - block(4)),
        "seconds": stats["budget"]["steps"]["repack_8_to_4"]["seconds"],
    }  # fmt: skip
    after = cache.retrieve(0)
    # only the oldest 24 tokens changed (to 4-bit precision); the newer ones read back exactly as before
    assert torch.equal(after[0][:, :, 24:], before[0][:, :, 24:])
    assert not torch.equal(after[0][:, :, :24], before[0][:, :, :24])

    # every block to 4 bits, then 4 -> 2 on the 2 oldest
    all_four = 2 * 8 * block(4) + WINDOW_BYTES
    shrink_to(cache, (all_four - 2 * (block(4) - block(2)) - 1) / MIB)
    held = all_four - 2 * 2 * (block(4) - block(2))
    stats = cache.get_stats()
    assert stats["total_bytes"] == held
    assert stats["budget"]["tokens_at_bits"]["keys"] == {4: 48, 2: 16}
    assert stats["budget"]["steps"]["repack_4_to_2"]["bytes_freed"] == 2 * 2 * (block(4) - block(2))

    # below every block at 2 bits: the oldest blocks are dropped; the sequence length still counts them
    all_two = 2 * 8 * block(2) + WINDOW_BYTES
    shrink_to(cache, (all_two - 1) / MIB)
    held = all_two - 2 * block(2)
    stats = cache.get_stats()
    assert stats["total_bytes"] == held
    assert stats["budget"]["dropped_tokens"] == 8 and stats["budget"]["dropped_blocks"] == 1
    assert stats["budget"]["tokens_at_bits"]["values"] == {2: 56}
    assert stats["budget"]["steps"]["drop"]["bytes_freed"] == 2 * block(2)
    assert cache.get_seq_length() == 72
    assert cache.layers[0].get_mask_sizes(1) == (72 - 8 + 1, 8)
    assert cache.retrieve(0)[0].shape[-2] == 64


def test_a_store_over_the_budget_repacks_first_and_the_prediction_stays_exact():
    cache = filled("repack")
    # one more block's worth of tokens needs room: the 8 -> 4 step makes it
    k, v = tokens(8, seed=1)
    layer = cache.layers[0]
    grown = layer.nbytes_after_append(k, v)
    shrink_to(cache, (grown - 1) / MIB)
    assert cache.get_stats()["total_bytes"] == 2 * 8 * block(8) + WINDOW_BYTES  # fits now: nothing shrunk yet
    assert cache.get_stats()["budget"]["steps"]["repack_8_to_4"]["events"] == 0
    cache.store(0, k, v)
    stats = cache.get_stats()
    assert stats["total_bytes"] == grown - 2 * (block(8) - block(4)) <= cache.budget_bytes
    assert stats["budget"]["tokens_at_bits"]["keys"] == {8: 64, 4: 8}


def test_over_what_repacking_can_free_the_policy_refuses_naming_the_budget(caplog):
    cache = filled("repack", quant_type="int4")
    all_two = 2 * 8 * block(2) + WINDOW_BYTES
    with caplog.at_level(logging.WARNING, logger="hf_kvcache_plugin.cache"):
        cache.resize((all_two - 1) / MIB)
    assert f"the cache holds {2 * 8 * block(4) + WINDOW_BYTES} bytes: the next update shrinks it" in caplog.text
    with pytest.raises(CacheBudgetExceeded, match=r"holding the cache under .* MiB is refused"):
        cache.shrink_to_budget()
    assert cache.get_stats()["total_bytes"] == all_two  # re-packed as far as allowed (and kept), nothing dropped
    with pytest.raises(CacheBudgetExceeded) as refused:
        cache.store(0, *tokens(1))
    message = str(refused.value)
    assert f"budget `max_size_mb` is {all_two - 1} bytes" in message
    assert "after the shrink steps ['repack_8_to_4', 'repack_4_to_2'] of `budget_policy` 'repack' ran out" in message
    assert cache.get_seq_length() == 72


def test_drop_keeps_the_bits_and_the_sinks():
    cache = filled("drop", quant_type="int4", sink_tokens=4)  # 4 sinks, then 64 tokens: 7 blocks + 12 exact
    layer = cache.layers[0]
    sinks = layer.sink_keys.clone()
    held = cache.get_stats()["total_bytes"]
    shrink_to(cache, (held - 1) / MIB)
    stats = cache.get_stats()
    assert stats["total_bytes"] == held - 2 * block(4)
    assert stats["budget"]["tokens_at_bits"]["keys"] == {4: 48}
    assert stats["budget"]["steps"]["repack_4_to_2"]["events"] == 0
    assert torch.equal(layer.sink_keys, sinks) and stats["budget"]["dropped_tokens"] == 8
    keys, _ = cache.retrieve(0)
    assert torch.equal(keys[:, :, :4], sinks)


def test_crop_into_dropped_tokens_is_refused():
    cache = filled("drop")
    shrink_to(cache, (cache.get_stats()["total_bytes"] - 1) / MIB)
    with pytest.raises(ValueError, match="8 tokens before the last 64 were dropped"):
        cache.crop(-70)
    cache.crop(-10)
    assert cache.get_seq_length() == 62 and cache.layers[0].get_mask_sizes(0) == (54, 8)


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(x.pow(2).mean() / (x - y).pow(2).mean()))


def test_two_bits_repacked_from_int4_codes_lose_little_against_two_bits_from_the_values():
    x = torch.randn(1, 4, 64, 8, 64, generator=torch.Generator().manual_seed(0))
    direct = dequantize(quantize(x, bits=2, group_size=8, axis=3))
    via4 = dequantize(quantize(dequantize(quantize(x, bits=4, group_size=8, axis=3)), bits=2, group_size=8, axis=3))
    via8 = dequantize(quantize(dequantize(quantize(dequantize(quantize(x, bits=8, group_size=8, axis=3)), bits=4,
                                                    group_size=8, axis=3)), bits=2, group_size=8, axis=3))
    # asymmetric min/max grids nest (2-bit levels are 4- and 8-bit levels, the range is kept): nothing is lost
    assert sqnr_db(x, via4) == pytest.approx(sqnr_db(x, direct), abs=0.01)
    assert sqnr_db(x, via8) == pytest.approx(sqnr_db(x, direct), abs=0.01)


def test_the_policy_is_a_config_key():
    assert QuantizedKVCache(None, num_layers=1).get_stats()["budget"]["policy"] == "repack"
    cache = QuantizedKVCache.from_config(parse_config({"cache": {"budget_policy": "repack_then_drop"}}), num_layers=1)
    assert cache.get_stats()["budget"]["policy"] == "repack_then_drop"
    with pytest.raises(ConfigError, match="budget_policy"):
        parse_config({"cache": {"budget_policy": "evict"}})


@pytest.fixture(scope="module")
def small_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(head_dim=16, layers=2)).eval()


def _generate(model, cache, prompt, new_tokens):
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          **{GENERATE_CACHE_KWARG: cache})


@pytest.mark.parametrize("attention", ["fused", "dequantize"])
def test_generation_under_a_budget_repacks_then_drops_and_positions_go_on(small_model, attention):
    prompt = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    # few exact tokens (2 sinks, no window beyond the partial block) so that 20% of a DynamicCache binds early
    settings = {"quant_type": "int8", "group_size": 8, "residual_length": 0, "sink_tokens": 2, "attention": attention}
    unbounded = QuantizedKVCache(small_model.config, **settings)
    _generate(small_model, unbounded, prompt, 64)
    full = unbounded.get_stats()["fp_bytes"]  # what a DynamicCache holds
    cache = QuantizedKVCache(small_model.config, max_size_mb=full * 0.2 / MIB, budget_policy="repack_then_drop",
                             **settings)  # fmt: skip
    seen_positions = []
    hook = small_model.model.rotary_emb.register_forward_hook(
        lambda m, args, kwargs, out: seen_positions.append(kwargs["position_ids"][0, -1].item()), with_kwargs=True
    )
    try:
        out = _generate(small_model, cache, prompt, 64)
    finally:
        hook.remove()
    stats = cache.get_stats()
    assert out.shape[-1] == 80 and stats["total_bytes"] <= cache.budget_bytes
    budget = stats["budget"]
    assert budget["steps"]["repack_8_to_4"]["events"] and budget["steps"]["repack_4_to_2"]["events"]
    assert budget["dropped_tokens"] > 0 and budget["dropped_tokens"] % 8 == 0
    # positions count every token seen, dropped ones included: the last step is at position 78
    assert seen_positions[-1] == 78 and cache.get_seq_length() == 79
    held = cache.layers[0].sink_keys.shape[-2] + cache.layers[0].quantized_keys.num_tokens
    assert held + cache.layers[0].residual_keys.shape[-2] == 79 - budget["dropped_tokens"]


def test_fused_and_dequantized_attention_agree_after_drops(small_model):
    prompt = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    settings = {"quant_type": "int4", "group_size": 8, "residual_length": 8, "sink_tokens": 4,
                "budget_policy": "drop", "max_size_mb": 0.012}  # fmt: skip
    fused_cache = QuantizedKVCache(small_model.config, attention="fused", **settings)
    fused = _generate(small_model, fused_cache, prompt, 30)
    plain = _generate(small_model, QuantizedKVCache(small_model.config, attention="dequantize", **settings), prompt, 30)
    assert fused_cache.get_stats()["budget"]["dropped_tokens"] > 0
    assert torch.equal(fused, plain)


def test_the_sizer_drives_the_budget_and_the_cache_repacks():
    cache = filled("repack")
    cache.store(0, *tokens(1, seed=3))  # a decode step: the window moves into its capacity buffers first
    held = cache.get_stats()["total_bytes"]
    used = [0.5]
    monitor = MemoryMonitor(reader=lambda: MemoryReading.at_fraction(used[0]), clock=lambda: 0.0)
    sizer = create_adaptive_sizer(
        min_size_mb=0.0, max_size_mb=1.0, initial_size_mb=held / MIB, resize_callback=cache.resize,
        monitor=monitor, clock=lambda: 0.0, shrink_factor=0.75,
    )  # fmt: skip
    assert sizer.step().action == "hold" and cache.max_size_mb is None
    used[0] = 0.9  # high pressure: the sizer shrinks the budget by 0.75 (from its thread: only the number changes)
    decision = sizer.step()
    assert decision.action == "shrink" and cache.max_size_mb == pytest.approx(held * 0.75 / MIB)
    assert cache.get_stats()["total_bytes"] == held
    cache.store(0, *tokens(1, seed=2))  # the next update, on the model's thread, re-packs to fit
    stats = cache.get_stats()
    assert stats["total_bytes"] <= cache.budget_bytes
    assert stats["budget"]["tokens_at_bits"]["keys"][4] > 0


def test_a_shrunk_cache_saves_and_loads_whole(tmp_path):
    cache = filled("repack_then_drop")
    shrink_to(cache, (2 * 8 * block(2) + WINDOW_BYTES - 1) / MIB)  # every block at 2 bits, then one dropped
    cache.save(tmp_path / "shrunk.kvc")
    loaded = QuantizedKVCache.load(tmp_path / "shrunk.kvc")
    for a, b in zip(cache.retrieve(0), loaded.retrieve(0)):
        assert torch.equal(a, b)
    assert loaded.get_seq_length() == 72 and loaded.layers[0].get_mask_sizes(1) == (65, 8)
    assert loaded.get_stats()["budget"]["tokens_at_bits"] == cache.get_stats()["budget"]["tokens_at_bits"]


def test_repack_to_4_then_drop_never_goes_below_4_bits():
    cache = filled("repack_to_4_then_drop")
    all_four = 2 * 8 * block(4) + WINDOW_BYTES
    shrink_to(cache, (all_four - 1) / MIB)  # every block to 4 bits is not enough: the oldest is dropped, none to 2 bits
    stats = cache.get_stats()
    assert stats["total_bytes"] == all_four - 2 * block(4)
    assert stats["budget"]["tokens_at_bits"]["keys"] == {4: 56} and stats["budget"]["dropped_tokens"] == 8
    assert stats["budget"]["steps"]["repack_4_to_2"]["events"] == 0
