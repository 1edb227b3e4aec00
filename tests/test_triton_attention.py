"""Triton decode kernels against their references: the PyTorch fused path and dequantize-then-SDPA.

Without CUDA the kernels run in Triton's interpreter (numpy on the CPU), which
is slow: shapes are tiny, and block/split sizes are small so that every case
still crosses tiles, splits and partial last chunks.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # read by triton.jit when a function is decorated; conftest.py sets it before transformers imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'hf_kvcache_plugin[gpu]')")
if not torch.cuda.is_available():
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.standard.zeros, InterpretedFunction):
        pytest.skip("no CUDA, and triton was imported before TRITON_INTERPRET=1 was set (see conftest.py), so its "
                    "interpreter cannot run the kernels", allow_module_level=True)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hf_kvcache_plugin import create_quantized_kv_cache  # noqa: E402
from hf_kvcache_plugin.attention import dispatch as attention_module  # noqa: E402
from hf_kvcache_plugin.attention import attention_from_layer, quantized_attention_forward  # noqa: E402
from hf_kvcache_plugin.attention.triton_attention import triton_attention_from_layer, triton_unsupported  # noqa: E402

from .attention_reference import dequantize_then_sdpa, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the fused output is rounded to bf16 once: at most 2**-9 relative per element
BF16_OUTPUT_ROUNDING = 2**-8


def _layer(quant_type, kv_heads, head_dim, group, prefill, q_len, dtype, sinks=0, residual_blocks=1, symmetric=False,
           batch=1, seed=0):
    torch.manual_seed(seed)
    cache = create_quantized_kv_cache(
        quant_type, num_layers=1, num_heads=kv_heads, head_dim=head_dim, group_size=group,
        residual_length=group * residual_blocks, sink_tokens=sinks, symmetric=symmetric, mixed_int8_tokens=2 * group,
    )
    k = (torch.randn(batch, kv_heads, prefill + q_len, head_dim) * 2).to(dtype).to(DEVICE)
    v = torch.randn(batch, kv_heads, prefill + q_len, head_dim).to(dtype).to(DEVICE)
    cache.update(k[:, :, :prefill], v[:, :, :prefill], 0)
    cache.update(k[:, :, prefill:], v[:, :, prefill:], 0)
    return cache.layers[0]


def _mask(batch, q_len, total, pad):
    mask = torch.ones(total, total, dtype=torch.bool).tril()[-q_len:][None, None].repeat(batch, 1, 1, 1)
    mask[-1, :, :, :pad] = False  # left padding on the last sequence
    return mask.to(DEVICE)


def _check(out, query, layer, mask, scaling):
    assert out.dtype == query.dtype and out.shape == query.shape
    fused = attention_from_layer(query, layer, mask, scaling)
    truth = dequantize_then_sdpa(query, layer, mask, scaling)  # float32 over the same codes and scales
    if query.dtype == torch.float32:
        assert rel_err(out, fused) <= 1e-5
        assert rel_err(out, truth) <= 1e-5
    else:
        # both paths accumulate in float32 and round once at the end (see test_attention for the bf16 reasoning)
        assert rel_err(out, fused) <= BF16_OUTPUT_ROUNDING
        assert rel_err(out, truth) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["int8", "int4"])
def test_kernel_equals_references_with_gqa_sinks_residual_and_padding(quant_type, dtype):
    # 69 quantized tokens after 3 sinks: tiles of 16 and splits of 32 end part-way through a block
    layer = _layer(quant_type, kv_heads=2, head_dim=16, group=8, prefill=82, q_len=1, dtype=dtype, sinks=3, batch=2)
    query = torch.randn(2, 8, 1, 16).to(dtype).to(DEVICE)
    mask = _mask(2, 1, 83, pad=5)
    out = triton_attention_from_layer(query, layer, mask, 0.25, block_tokens=16, split_tokens=32)
    _check(out, query, layer, mask, 0.25)


@pytest.mark.parametrize("group", [8, 16])  # 16: every 16-token tile lies in one block
@pytest.mark.parametrize("quant_type,symmetric", [("mixed", False), ("int4", True), ("int2", False)])
def test_kernel_covers_mixed_tiers_symmetric_codes_and_int2(quant_type, symmetric, group):
    layer = _layer(quant_type, kv_heads=1, head_dim=16, group=group, prefill=60, q_len=1, dtype=torch.float32,
                   symmetric=symmetric)
    query = torch.randn(1, 2, 1, 16, device=DEVICE)
    out = triton_attention_from_layer(query, layer, None, 0.25, block_tokens=16, split_tokens=16)
    _check(out, query, layer, None, 0.25)


def test_several_queries_without_a_mask_are_causal():
    layer = _layer("int4", kv_heads=2, head_dim=16, group=8, prefill=40, q_len=3, dtype=torch.float32)
    query = torch.randn(1, 4, 3, 16, device=DEVICE)
    out = triton_attention_from_layer(query, layer, None, 0.25, block_tokens=16)
    _check(out, query, layer, _mask(1, 3, 43, pad=0), 0.25)


def test_fully_masked_row_gives_zeros_like_the_reference():
    layer = _layer("int8", kv_heads=1, head_dim=16, group=8, prefill=30, q_len=1, dtype=torch.float32, batch=2)
    query = torch.randn(2, 1, 1, 16, device=DEVICE)
    mask = _mask(2, 1, 31, pad=0)
    mask[1] = False
    out = triton_attention_from_layer(query, layer, mask, 0.25, block_tokens=16)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel_err(out[0], attention_from_layer(query, layer, mask, 0.25)[0]) <= 1e-5


@settings(max_examples=20, deadline=None)
@given(
    quant_type=st.sampled_from(["int8", "int4"]),
    kv_heads=st.integers(1, 2),
    n_rep=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([8, 16, 24]),
    residual_blocks=st.integers(0, 1),
    sinks=st.integers(0, 3),
    prefill=st.integers(1, 50),
    q_len=st.integers(1, 2),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 10_000),
)
def test_kernel_equals_references_over_random_shapes(
    quant_type, kv_heads, n_rep, head_dim, residual_blocks, sinks, prefill, q_len, dtype, seed,
):
    layer = _layer(quant_type, kv_heads, head_dim, 8, prefill, q_len, dtype, sinks=sinks,
                   residual_blocks=residual_blocks, seed=seed)
    query = torch.randn(1, kv_heads * n_rep, q_len, head_dim).to(dtype).to(DEVICE)
    mask = _mask(1, q_len, prefill + q_len, pad=0)
    scaling = head_dim**-0.5
    out = triton_attention_from_layer(query, layer, mask, scaling, block_tokens=16, split_tokens=32)
    _check(out, query, layer, mask, scaling)


BF16_DOT_IN_INTERPRETER = pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton 3.9's interpreter computes bf16 tl.dot wrongly (|error| ~1e10 on a 16x16 "
    "product of N(0, 1) inputs; fp16 is right), so bf16 low-precision matmuls are checked on CUDA only")


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=BF16_DOT_IN_INTERPRETER)])
@pytest.mark.parametrize("quant_type", ["int8", "int4"])
def test_low_precision_dots_stay_within_the_half_precision_bound(quant_type, dtype):
    layer = _layer(quant_type, kv_heads=2, head_dim=32, group=16, prefill=90, q_len=1, dtype=dtype, sinks=2)
    query = torch.randn(1, 8, 1, 32).to(dtype).to(DEVICE)
    out = triton_attention_from_layer(query, layer, None, 32**-0.5, block_tokens=16, split_tokens=32,
                                      low_precision_dots=True)
    assert out.dtype == dtype
    assert rel_err(out, dequantize_then_sdpa(query, layer, None, 32**-0.5)) <= 1e-2


def test_unsupported_layouts_are_named_and_refused():
    cache = create_quantized_kv_cache("int4", num_layers=1, num_heads=1, head_dim=16, group_size=8, residual_length=0,
                                      key_axis="token")
    cache.update(torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16), 0)
    cache.update(torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16), 0)
    query = torch.randn(1, 1, 1, 16)
    assert "grouped per channel" in triton_unsupported(query, cache.layers[0])
    with pytest.raises(ValueError, match="grouped per channel"):
        triton_attention_from_layer(query, cache.layers[0], None, 0.25)
    assert "query rows" in triton_unsupported(torch.randn(1, 1, 65, 16), cache.layers[0])


def test_cpu_tensors_keep_the_pytorch_path(monkeypatch):
    cache = create_quantized_kv_cache("int4", num_layers=1, num_heads=1, head_dim=16, group_size=8, residual_length=8)
    k, v = torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16)
    cache.update(k, v, 0)
    channel: dict = {}
    cache.fused_update(k[:, :, :1], v[:, :, :1], 0, channel)

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton path ran for CPU tensors")

    monkeypatch.setattr(attention_module, "triton_attention_from_layer", refuse)
    out, _ = quantized_attention_forward(torch.nn.Module(), torch.randn(1, 1, 1, 16), None, None, None, scaling=0.25,
                                         **channel)
    assert out.shape == (1, 1, 1, 16)
