"""The optimised quantize / dequantize paths against the reference: chunking, layouts, strided outputs."""

from __future__ import annotations

import pytest
import torch

from hf_kvcache_plugin import quantization
from hf_kvcache_plugin.block_tensors import cat_blocks as _cat, slice_blocks as _slice
from hf_kvcache_plugin.blocks import BlockCodec, QuantizedBlocks
from hf_kvcache_plugin.quantization import (
    dequantize,
    dequantize_into,
    dequantize_reference,
    pack_codes,
    quantize,
    quantize_reference,
    unpack_codes,
)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_many_chunks_match_reference(monkeypatch, bits, axis, symmetric):
    # a chunk of 64 elements forces several chunks, including a short last one
    monkeypatch.setattr(quantization, "_CHUNK_ELEMENTS", 64)
    torch.manual_seed(bits)
    x = torch.randn(3, 8, 24) * 2 - 0.3
    fast = quantize(x, bits, 8, axis=axis, symmetric=symmetric, scale_dtype=torch.float16)
    ref = quantize_reference(x, bits, 8, axis=axis, symmetric=symmetric, scale_dtype=torch.float16)
    assert torch.equal(fast.data, ref.data) and torch.equal(fast.scale, ref.scale)
    if not symmetric:
        assert torch.equal(fast.zero, ref.zero)
    torch.testing.assert_close(dequantize(fast), dequantize_reference(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4])
def test_portable_unpack_matches_swar(monkeypatch, bits):
    codes = torch.randint(0, 2**bits, (5, 3, 32), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_codes(packed, bits), codes)
    monkeypatch.setattr(quantization, "_SWAR", False)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("axis", [1, 2])
def test_dequantize_into_a_strided_view(dtype, axis):
    torch.manual_seed(3)
    x = torch.randn(2, 16, 16, dtype=dtype)
    q = quantize(x, 4, 8, axis=axis)
    big = torch.zeros(2, 16, 40, dtype=dtype)
    window = big[:, :, 8:24]  # non-contiguous: rows of 16 inside rows of 40
    dequantize_into(q, window)
    assert torch.equal(window, dequantize(q))
    assert big[:, :, :8].abs().sum() == 0 and big[:, :, 24:].abs().sum() == 0


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_blocks_survive_cat_slice_and_batch_ops(bits, axis):
    """Concatenation, slicing and batch selection may change the storage order; values must not change."""
    torch.manual_seed(bits)
    codec = BlockCodec(bits, 8, axis, scale_dtype=torch.float16)
    tokens = torch.randn(3, 2, 32, 16, dtype=torch.bfloat16)
    whole = dequantize(codec.encode(tokens)).flatten(2, 3)
    stream = QuantizedBlocks(codec)
    stream.append(tokens[:, :, :16])
    stream.append(tokens[:, :, 16:])
    assert torch.equal(stream.dequantize(torch.bfloat16), whole)
    head, tail = _slice(stream.recent, 0, 1), _slice(stream.recent, 1, 4)
    assert torch.equal(dequantize(_cat([head, tail])).flatten(2, 3), whole)
    stream.map_tensors(lambda t: t.index_select(0, torch.tensor([2, 0])))  # returns contiguous tensors
    assert torch.equal(stream.dequantize(torch.bfloat16), whole[[2, 0]])
