"""Without an engine: the paged layout read back exactly, and bad connector settings refused by name."""

from __future__ import annotations

import pytest
import torch

from hf_kvcache_plugin.config import ConfigError
from hf_kvcache_plugin.integrations.vllm_blocks import BlockLayout, ChunkCodec, split_kv
from hf_kvcache_plugin.integrations.vllm_connector import connector_settings


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_probed_layout_reads_back_what_vllms_op_wrote(dtype):
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    blocks, heads, block, head_size = 5, 3, 128, 64
    isa = _get_attn_isa(dtype, block, head_size, "auto")

    def write(key, value, key_cache, value_cache, slots):
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

    layout = BlockLayout.probe(write, block, head_size, dtype)
    buffer = torch.zeros(blocks, heads, block, 2 * head_size, dtype=dtype)
    block_ids = torch.tensor([3, 1])
    keys, values = torch.randn(2, 2 * block, heads, head_size).to(dtype)
    slots = (block_ids[:, None] * block + torch.arange(block)).flatten()
    write(keys, values, *split_kv(buffer), slots)
    read_keys, read_values = layout.read(buffer, block_ids)
    assert torch.equal(read_keys, keys.transpose(0, 1))
    assert torch.equal(read_values, values.transpose(0, 1))


def test_a_chunk_round_trips_through_the_full_precision_codec_exactly():
    chunk = torch.randn(2, 128, 64)
    k, v = ChunkCodec(None, 1).encode(0, chunk, chunk * 2)
    assert torch.equal(ChunkCodec.decode(k, torch.float32), chunk)
    assert k.nbytes == chunk.numel() * 4


@pytest.mark.parametrize(
    "extra,error,message",
    [
        ({"cach": {}}, ValueError, r"unknown keys \['cach'\]"),
        ({"prefix_store": {"chunk_size": 64}}, ValueError, r"chunk_size has to be vLLM's block size \(128\) but got 64"),
        ({"cache": {"quant_type": "int3"}}, ConfigError, r"`cache.quant_type` has to be one of"),
        ({"full_precision": "yes"}, ValueError, r"`full_precision` has to be true or false but got 'yes'"),
        ({"config": "/nonexistent.yaml"}, ValueError, r"file '/nonexistent.yaml' does not exist"),
    ],
)
def test_bad_settings_are_refused_by_name(extra, error, message):
    with pytest.raises(error, match=message):
        connector_settings(extra, block_size=128, num_layers=2, head_size=64)


def test_config_sections_the_connector_does_not_apply_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cache: {quant_type: int4}\nserving: {}\n")
    with pytest.raises(ValueError, match=r"applies only the .* sections but the config has \['serving'\]"):
        connector_settings({"config": str(path)}, block_size=128, num_layers=2, head_size=64)


def test_settings_resolve_the_group_size_for_the_model():
    settings = connector_settings({"cache": {"quant_type": "int4"}}, block_size=128, num_layers=2, head_size=64)
    assert (settings.cache.resolved_key_bits, settings.cache.group_size, settings.prefix_store.chunk_size) == (4, 64, 128)
    assert (settings.sizer, settings.distributed) == (None, None)
    assert connector_settings({"full_precision": True}, block_size=128, num_layers=2, head_size=64).cache is None
