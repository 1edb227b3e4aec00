"""Quantizer objects (Int8Quantizer, Int4Quantizer, MixedPrecisionQuantizer): quality by SQNR, modes, errors."""

from __future__ import annotations

import pytest
import torch

from hf_kvcache_plugin import (
    GroupQuantizer,
    Int4Quantizer,
    Int8Quantizer,
    MixedPrecisionQuantizer,
    dequantize,
    quantize,
)
from hf_kvcache_plugin.quantization import sqnr_db

# Gaussian K/V [batch, heads, seq, head_dim]. Measured over the modes below: INT8 43.7-46.8 dB, INT4
# 18.6-22.1 dB; the thresholds sit below those, far above what a broken scale, zero or packing step gives.
MIN_SQNR = {8: 42.0, 4: 17.0}


def kv(seq: int = 128, head_dim: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, seq, head_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("quantizer_cls", [Int8Quantizer, Int4Quantizer])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("group_size", [None, 32])
def test_round_trip_sqnr(quantizer_cls, symmetric, axis, group_size):
    quantizer = quantizer_cls(symmetric=symmetric, axis=axis, group_size=group_size)
    x = kv()
    q = quantizer.quantize(x)
    y = quantizer.dequantize(q)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert q.bits == quantizer.bits and (q.zero is None) == symmetric
    assert sqnr_db(x, y) > MIN_SQNR[quantizer.bits]


def test_the_objects_are_the_primitives_with_their_settings_bound():
    x = kv()
    q = Int4Quantizer(symmetric=True, axis="channel", group_size=16).quantize(x)
    ref = quantize(x, 4, 16, axis=-2, symmetric=True)
    assert torch.equal(q.data, ref.data) and torch.equal(q.scale, ref.scale)
    torch.testing.assert_close(Int4Quantizer().dequantize(q), dequantize(ref))


def test_eight_bits_beat_four_and_smaller_blocks_beat_larger():
    x = kv()
    assert sqnr_db(x, Int8Quantizer().round_trip(x)) > sqnr_db(x, Int4Quantizer().round_trip(x)) + 20
    small, large = Int4Quantizer(group_size=16), Int4Quantizer(group_size=64)
    assert sqnr_db(x, small.round_trip(x)) > sqnr_db(x, large.round_trip(x))


def test_group_size_none_is_one_group_per_token_or_per_channel():
    x = kv(seq=96, head_dim=32)
    assert Int8Quantizer(axis="token").quantize(x).group_size == 32
    assert Int8Quantizer(axis="channel").quantize(x).group_size == 96
    assert Int4Quantizer().group_size == 64  # block-wise by default


def test_per_channel_scales_follow_channels_of_very_different_ranges():
    # keys have outlier channels (KIVI): a scale per channel keeps the small channels' resolution
    x = kv(seq=64, head_dim=64) * torch.logspace(-2, 1, 64)
    small = slice(0, 32)  # the channels a per-token scale, set by the large ones, rounds away
    per_channel = Int4Quantizer(axis="channel", group_size=64).round_trip(x)
    per_token = Int4Quantizer(axis="token", group_size=64).round_trip(x)
    # measured: 21.1 dB per channel, -10.9 dB per token
    assert sqnr_db(x[..., small], per_channel[..., small]) > sqnr_db(x[..., small], per_token[..., small]) + 20


def test_percentile_clipping_trades_the_outlier_for_the_other_values():
    x = kv(seq=16, head_dim=64)
    x[..., 7] = 40.0  # one outlier per token
    inliers = torch.ones_like(x, dtype=torch.bool)
    inliers[..., 7] = False
    plain = Int4Quantizer().round_trip(x)
    clipped = Int4Quantizer(clip_percentile=95.0).round_trip(x)
    assert sqnr_db(x[inliers], clipped[inliers]) > sqnr_db(x[inliers], plain[inliers]) + 10
    assert (clipped[..., 7] < 10).all()  # the outlier itself is clipped


@pytest.mark.parametrize("quantizer", [Int8Quantizer(), Int4Quantizer(symmetric=True), Int4Quantizer(axis="channel")])
def test_zero_and_constant_inputs_stay_finite_and_exact(quantizer):
    zeros = torch.zeros(1, 2, 64, 64)
    assert torch.equal(quantizer.round_trip(zeros), zeros)
    constant = torch.full((1, 2, 64, 64), 0.75)
    if quantizer.symmetric:
        # the constant maps to the top level; only the stored scale's rounding remains
        torch.testing.assert_close(quantizer.round_trip(constant), constant, rtol=4 * torch.finfo().eps, atol=0)
    else:
        assert torch.equal(quantizer.round_trip(constant), constant)  # the zero offset holds the constant


def test_mixed_precision_keeps_the_newest_tokens_at_int8_and_the_older_at_int4():
    x = kv(seq=192)
    mixed = MixedPrecisionQuantizer(recent_tokens=64)
    q = mixed.quantize(x)
    assert q.aged.bits == 4 and q.aged.shape[-2] == 128 and q.recent.bits == 8 and q.recent.shape[-2] == 64
    assert q.num_tokens == 192
    y = mixed.dequantize(q)
    assert y.shape == x.shape
    assert sqnr_db(x[..., 128:, :], y[..., 128:, :]) > MIN_SQNR[8]
    assert MIN_SQNR[4] < sqnr_db(x[..., :128, :], y[..., :128, :]) < MIN_SQNR[8]
    assert Int4Quantizer().quantize(x).nbytes < q.nbytes < Int8Quantizer().quantize(x).nbytes
    assert [mixed.bits_for_age(a) for a in (0, 63, 64, 1000)] == [8, 8, 4, 4]


def test_mixed_precision_with_all_tokens_recent_or_all_aged():
    x = kv(seq=32)
    assert MixedPrecisionQuantizer(recent_tokens=64).quantize(x).aged is None
    all_aged = MixedPrecisionQuantizer(recent_tokens=0).quantize(x)
    assert all_aged.recent is None and all_aged.aged.bits == 4


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: GroupQuantizer(bits=3), r"`bits` has to be one of \[2, 4, 8\] but got 3"),
        (lambda: Int8Quantizer(axis="row"), r"`axis` has to be one of \['token', 'channel'\] but got 'row'"),
        (lambda: Int4Quantizer(group_size=0), r"`group_size` has to be a positive integer or None but got 0"),
        (lambda: Int4Quantizer(clip_percentile=40), r"`clip_percentile` has to be in \(50, 100\] or None but got 40"),
        (lambda: Int8Quantizer(symmetric="yes"), r"`symmetric` has to be True or False but got 'yes'"),
        (lambda: MixedPrecisionQuantizer(recent_tokens=-1), r"`recent_tokens` has to be an integer >= 0 but got -1"),
        (lambda: MixedPrecisionQuantizer(recent="int8"), r"`recent` has to be a quantizer .* but got str"),
    ],
)
def test_bad_settings_name_the_argument_and_the_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_a_group_that_does_not_divide_the_axis_is_an_error_naming_it():
    with pytest.raises(ValueError, match="group_size"):
        Int4Quantizer(axis="channel", group_size=64).quantize(kv(seq=100))
    with pytest.raises(ValueError, match=r"\[\.\.\., seq, head_dim\]"):
        Int8Quantizer().quantize(torch.randn(8))
