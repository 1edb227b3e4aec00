"""The C++ CPU decode kernel: the same sums as the PyTorch reference, a logged fallback when it cannot be built."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from hf_kvcache_plugin import QuantizedKVCache
from hf_kvcache_plugin.attention import cpu_kernel
from hf_kvcache_plugin.attention.reference import quantized_key_scores, quantized_value_output
from hf_kvcache_plugin.blocks import BlockCodec

from .attention_reference import rel_err


@pytest.fixture(scope="module", autouse=True)
def built():
    # the kernel ships with the package: a machine that runs this suite has to be able to build it
    assert cpu_kernel.cpu_kernel_available(), cpu_kernel._state.get("reason")


SCALE_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize(
    "rows, head_dim, group",
    [(1, 128, 64), (1, 128, 32), (4, 128, 64), (1, 40, 8), (3, 8, 8), (2, 48, 16)],
    ids=["decode", "decode-g32", "gqa", "tail-d40", "small", "gqa-d48"],
)
def test_kernel_equals_reference(bits, symmetric, scale_dtype, rows, head_dim, group):
    torch.manual_seed(bits * 100 + head_dim + rows)
    b, h, n = 2, 3, 5
    keys = BlockCodec(bits, group, "channel", symmetric, scale_dtype).encode(torch.randn(b, h, n * group, head_dim) * 3)
    values = BlockCodec(bits, group, "token", symmetric, scale_dtype).encode(torch.randn(b, h, n * group, head_dim))
    query = torch.randn(b, h, rows, head_dim)
    total, offset = n * group + 11, 5  # the tier sits inside a longer score row, as between sinks and residual
    expected = torch.full((b, h, rows, total), 7.0)
    quantized_key_scores(query, keys, expected[..., offset : offset + n * group], chunk_tokens=64)
    scores = torch.full((b, h, rows, total), 7.0)
    cpu_kernel.kernel_key_scores_parts(query, [keys], scores, offset)
    _assert_same_sums(scores, expected)

    probs = torch.softmax(torch.randn(b, h, rows, total), dim=-1)
    expected_out = torch.randn(b, h, rows, head_dim)
    out = expected_out.clone()
    quantized_value_output(probs[..., offset : offset + n * group], values, expected_out, chunk_tokens=64)
    cpu_kernel.kernel_value_output_parts(probs, offset, [values], out)
    _assert_same_sums(out, expected_out)


def _assert_same_sums(got: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 sums of the same terms in another order: off by a few ulps of the largest magnitude."""
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-5 * scale
    assert rel_err(got, expected) <= 1e-5  # a wrong code, scale or token would be ~1e-1


def test_kernel_refuses_what_does_not_fit():
    keys = BlockCodec(4, 8, "channel").encode(torch.randn(1, 2, 16, 16))
    scores = torch.zeros(1, 2, 1, 10)  # 16 tokens do not fit in 10
    with pytest.raises(RuntimeError, match="cannot hold 16 tokens at offset 0"):
        cpu_kernel.kernel_key_scores_parts(torch.randn(1, 2, 1, 16), [keys], scores, 0)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        cpu_kernel.kernel_key_scores_parts(torch.randn(1, 2, 1, 16).double(), [keys], torch.zeros(1, 2, 1, 16), 0)


def _generate(model, cache, prompt, new_tokens=24):
    with torch.no_grad():
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def test_generate_through_the_kernel_equals_the_reference_path(realistic_model, monkeypatch):
    model = realistic_model  # head_dim 64, two query heads per KV head
    prompt = torch.randint(3, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(0))
    options = dict(group_size=16, residual_length=16)
    with_kernel = _generate(model, QuantizedKVCache(model.config, "int4", **options), prompt)
    monkeypatch.setitem(cpu_kernel._state, "ok", False)
    monkeypatch.setitem(cpu_kernel._state, "reason", "disabled by the test")
    reference = _generate(model, QuantizedKVCache(model.config, "int4", **options), prompt)
    assert with_kernel == reference


def test_cpu_kernel_off_in_the_config_keeps_the_reference_path(realistic_model, monkeypatch):
    model = realistic_model
    prompt = torch.randint(3, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(0))
    options = dict(group_size=16, residual_length=16)
    with_kernel = _generate(model, QuantizedKVCache(model.config, "int4", **options), prompt)

    def refuse(*args):
        raise AssertionError("the kernel ran with cpu_kernel: off")

    from hf_kvcache_plugin.attention import reference

    monkeypatch.setattr(reference, "kernel_key_scores_parts", refuse)
    monkeypatch.setattr(reference, "kernel_value_output_parts", refuse)
    off = QuantizedKVCache(model.config, "int4", cpu_kernel="off", **options)
    assert off.uses_fused_attention
    assert _generate(model, off, prompt) == with_kernel


def test_without_a_compiler_the_reference_runs_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernel, "_state", {})
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(cpu_kernel, "_build_name", lambda: "hf_kvcache_cpu_test_missing_compiler")
    with caplog.at_level(logging.WARNING, logger=cpu_kernel.__name__):
        assert not cpu_kernel.cpu_kernel_available()
        assert not cpu_kernel.cpu_kernel_available()  # tried once per process
    warnings = [r.getMessage() for r in caplog.records if "CPU decode kernel is unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "the C++ build failed" in warnings[0]
    assert cpu_kernel.cpu_kernel_unsupported(torch.zeros(1)) == cpu_kernel._state["reason"]


def test_environment_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_state", {})
    monkeypatch.setenv("HF_KVCACHE_CPU_KERNEL", "0")
    assert not cpu_kernel.cpu_kernel_available()
    assert cpu_kernel._state["reason"] == "HF_KVCACHE_CPU_KERNEL=0"


def _decode_step(model, cache, token):
    return model(input_ids=token, past_key_values=cache, use_cache=True).logits


def test_decode_steps_compile_whole_and_equal_eager(realistic_model):
    """torch.compile traces every decode step, flushes included, through the cache and the kernel (its ops have
    fake versions; inside traces the finite check of a flush runs in an opaque op) in one graph, and the compiled step,
    run with the eager backend, gives the eager logits."""
    model = realistic_model
    prompt = torch.randint(3, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(1))
    caches = [QuantizedKVCache(model.config, "int4", group_size=16, residual_length=16) for _ in range(2)]
    assert caches[0].uses_fused_attention
    token = prompt[:, -1:]
    torch._dynamo.reset()
    with torch.no_grad():
        for cache in caches:
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
        # 70 tokens leave 22 in the window; it reaches 32 and flushes a block on the tenth step
        for _ in range(12):
            explained = torch._dynamo.explain(_decode_step)(model, caches[0], token)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
            _decode_step(model, caches[1], token)
        assert caches[0].layers[0].quantized_keys.num_blocks == 4  # the flush happened inside the traces
        compiled = torch.compile(_decode_step, backend="eager", fullgraph=True)
        compiled_logits = compiled(model, caches[0], token)
        eager_logits = _decode_step(model, caches[1], token)
    assert caches[0].get_seq_length() == caches[1].get_seq_length() == 83
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=0, atol=0)


def test_decode_steps_compiled_by_inductor_store_the_codes_eager_stores(realistic_model):
    """With the default backend (Inductor), a flush inside a compiled step quantizes through an opaque op:
    Inductor would otherwise fuse the scale's round trip through fp16 away and store other codes than eager,
    and every later step (and a stored prefix) would inherit them. Logits differ from eager by the few ulps by
    which the model's own fused float ops round differently."""
    model = realistic_model
    prompt = torch.randint(3, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(2))
    caches = [QuantizedKVCache(model.config, "int4", group_size=16, residual_length=16) for _ in range(2)]
    token = prompt[:, -1:]
    torch._dynamo.reset()
    compiled = torch.compile(_decode_step, fullgraph=True)
    with torch.no_grad():
        for cache in caches:
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
        # steps 10, 26 and 42 flush a block; in between the window's length varies, so Dynamo recompiles the
        # step with symbolic sizes (where a view of the window next to its buffer used to crash Inductor)
        for _ in range(44):
            compiled_logits = compiled(model, caches[0], token)
            eager_logits = _decode_step(model, caches[1], token)
            torch.testing.assert_close(compiled_logits, eager_logits, rtol=0, atol=1e-5)
    for layer, reference in zip(caches[0].layers, caches[1].layers):
        assert layer.quantized_keys.num_blocks == reference.quantized_keys.num_blocks == 6
        for stream in ("quantized_keys", "quantized_values"):
            got, expected = getattr(layer, stream).recent, getattr(reference, stream).recent
            assert torch.equal(got.data, expected.data) and torch.equal(got.scale, expected.scale)
            # a zero is the block's minimum in fp16; the compiled model's keys differ from eager's by an ulp
            # now and then (its fused RoPE), which moves the rounding of about 0.1% of zeros
            assert (got.zero != expected.zero).float().mean().item() <= 0.01
            torch.testing.assert_close(got.zero, expected.zero, rtol=1e-3, atol=0)


def test_generate_with_an_inductor_compiled_forward_equals_eager(realistic_model):
    """A user's ``torch.compile`` of the model's forward, through ``generate``: 60 tokens, four flushes, the
    window's length and the parts' sizes varying, so Dynamo recompiles with symbolic sizes. Inductor used to
    fail there twice over: on a size known only as a Python int (a symbol no graph input defines) and on the
    window's buffer and a view of it entering the graph as two inputs, one mutated."""
    model = copy.deepcopy(realistic_model)
    prompt = torch.randint(3, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(2))

    def generate(cache):
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                              max_new_tokens=60, min_new_tokens=60, do_sample=False, pad_token_id=0)

    expected = generate(QuantizedKVCache(model.config, "int4", group_size=16, residual_length=16))
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward)
    with torch.no_grad():
        got = generate(QuantizedKVCache(model.config, "int4", group_size=16, residual_length=16))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("rows", [1, 4])
def test_a_tier_in_parts_gives_the_sums_of_one_tensor_bit_for_bit(bits, symmetric, rows):
    """One kernel call reads all parts of a tier with one set of accumulators: the same bits as the tier held
    whole, so how a history is cut into parts never changes output (prefix reuse stays bit-exact)."""
    from hf_kvcache_plugin.block_tensors import slice_blocks as _slice

    torch.manual_seed(bits + rows)
    b, h, n, group, d = 2, 3, 7, 16, 48
    keys = BlockCodec(bits, group, "channel", symmetric, torch.float16).encode(torch.randn(b, h, n * group, d) * 3)
    values = BlockCodec(bits, group, "token", symmetric, torch.float16).encode(torch.randn(b, h, n * group, d))
    query = torch.randn(b, h, rows, d)
    total, offset = n * group + 9, 4
    probs = torch.softmax(torch.randn(b, h, rows, total), dim=-1)
    whole_scores, whole_out = torch.zeros(b, h, rows, total), torch.zeros(b, h, rows, d)
    cpu_kernel.kernel_key_scores_parts(query, [keys], whole_scores, offset)
    cpu_kernel.kernel_value_output_parts(probs, offset, [values], whole_out)
    for cuts in ([0, 1, 7], [0, 3, 4, 7], [0, 2, 4, 6, 7]):
        k_parts = [_slice(keys, i, j) for i, j in zip(cuts, cuts[1:])]
        v_parts = [_slice(values, i, j) for i, j in zip(cuts, cuts[1:])]
        scores, out = torch.zeros(b, h, rows, total), torch.zeros(b, h, rows, d)
        cpu_kernel.kernel_key_scores_parts(query, k_parts, scores, offset)
        cpu_kernel.kernel_value_output_parts(probs, offset, v_parts, out)
        assert torch.equal(scores, whole_scores) and torch.equal(out, whole_out)


def test_parts_that_do_not_belong_together_are_refused():
    codec = BlockCodec(4, 16, "channel", False, torch.float16)
    a = codec.encode(torch.randn(1, 2, 32, 16))
    other = BlockCodec(4, 8, "channel", False, torch.float16).encode(torch.randn(1, 2, 32, 16))
    with pytest.raises(RuntimeError, match="different group sizes"):
        cpu_kernel.kernel_key_scores_parts(torch.randn(1, 2, 1, 16), [a, other], torch.zeros(1, 2, 1, 64), 0)
