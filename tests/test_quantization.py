"""Quantization primitives: fast path against the reference, SQNR thresholds, edge cases."""

from __future__ import annotations

import pytest
import torch

from hf_kvcache_plugin.quantization import (
    dequantize,
    dequantize_reference,
    pack_codes,
    quantize,
    quantize_reference,
    sqnr_db,
    unpack_codes,
)

# Gaussian data, asymmetric min/max quantization: the uniform-quantizer SQNR is about
# 6.02 * bits + 10*log10(12 * var / range^2). Measured (group 32): int8 ~ 42 dB,
# int4 ~ 17.8 dB, int2 ~ 5.3 dB. Thresholds sit ~2 dB below so that a broken
# rounding, scale or packing step (which costs far more) fails.
MIN_SQNR = {8: 40.0, 4: 16.0, 2: 4.0}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 16), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 16 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis,group", [(-1, 8), (-1, 16), (2, 4), (1, 4)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_fast_path_matches_reference(bits, axis, group, symmetric, scale_dtype):
    torch.manual_seed(bits + group)
    x = torch.randn(2, 4, 8, 16) * 3 + 0.5
    fast = quantize(x, bits, group, axis=axis, symmetric=symmetric, scale_dtype=scale_dtype)
    ref = quantize_reference(x, bits, group, axis=axis, symmetric=symmetric, scale_dtype=scale_dtype)
    assert torch.equal(fast.data, ref.data)
    assert torch.equal(fast.scale, ref.scale)
    if not symmetric:
        assert torch.equal(fast.zero, ref.zero)
    torch.testing.assert_close(dequantize(fast), dequantize_reference(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sqnr_thresholds(bits, group, dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 64, 128).to(dtype)
    y = dequantize(quantize(x, bits, group, axis=-1))
    assert y.dtype == dtype and y.shape == x.shape
    # the output dtype's own rounding caps SQNR (bf16: 8 mantissa bits, ~ 52 dB)
    assert sqnr_db(x.float(), y.float()) > MIN_SQNR[bits]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_more_bits_and_smaller_groups_are_better(bits):
    torch.manual_seed(1)
    x = torch.randn(8, 256)
    s_small = sqnr_db(x, dequantize(quantize(x, bits, 16)))
    s_large = sqnr_db(x, dequantize(quantize(x, bits, 128)))
    assert s_small > s_large
    if bits < 8:
        assert sqnr_db(x, dequantize(quantize(x, bits * 2, 32))) > sqnr_db(x, dequantize(quantize(x, bits, 32))) + 9


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_and_constant_groups_are_exact(bits, symmetric, scale_dtype):
    x = torch.zeros(2, 32)
    x[1] = 0.75  # representable in every scale dtype
    q = quantize(x, bits, 16, symmetric=symmetric, scale_dtype=scale_dtype)
    y = dequantize(q)
    assert torch.isfinite(q.scale).all()
    assert torch.equal(y[0], x[0])  # all-zero groups: exact in every mode
    if symmetric:
        # the constant maps to the top level; only the stored scale's rounding remains
        torch.testing.assert_close(y[1], x[1], rtol=torch.finfo(scale_dtype).eps * 4, atol=0)
    else:
        assert torch.equal(y[1], x[1])  # asymmetric: the zero offset holds the constant itself


def test_tiny_values_do_not_divide_by_zero():
    x = torch.full((1, 16), 1e-30)
    x[0, 0] = 0.0
    y = dequantize(quantize(x, 4, 16, scale_dtype=torch.float32))
    assert torch.isfinite(y).all()
    assert (y - x).abs().max() < 1e-29


def test_clip_percentile_improves_bulk_resolution_with_outliers():
    torch.manual_seed(2)
    x = torch.randn(64, 128)
    x[:, 0] = 80.0  # one huge outlier per group of 128
    plain = dequantize(quantize(x, 4, 128))
    clipped = dequantize(quantize(x, 4, 128, clip_percentile=99.0))
    bulk = slice(1, None)
    assert sqnr_db(x[:, bulk], clipped[:, bulk]) > sqnr_db(x[:, bulk], plain[:, bulk]) + 6


def test_scales_stored_in_requested_dtype():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert quantize(x, 4, 32).scale.dtype == torch.bfloat16
    q = quantize(x, 4, 32, scale_dtype=torch.float32)
    assert q.scale.dtype == torch.float32 and q.zero.dtype == torch.float32
    assert q.nbytes == 4 * 64 // 2 + 2 * (4 * 2 * 4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(bits=3, group_size=8), "`bits` has to be one of [2, 4, 8] but got 3"),
        (dict(bits=4, group_size=7), "`group_size` must divide"),
        (dict(bits=4, group_size=8, clip_percentile=30.0), "`clip_percentile`"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        quantize(torch.randn(2, 16), **kwargs)


def test_integer_input_is_refused():
    with pytest.raises(ValueError, match="floating point"):
        quantize(torch.ones(2, 8, dtype=torch.int32), 4, 8)
