"""Trust boundaries (#14), cache inputs: autograd, batch selection, empty batches, device changes, bool indices."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from hf_kvcache_plugin import QuantizedKVCache, create_quantized_kv_cache

from .conftest import tiny_llama_config

# the PyTorch fused path: the C++ kernel (no backward) is tested elsewhere and costs a compile
OPTIONS = {"group_size": 8, "residual_length": 8, "cpu_kernel": "off"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # 3 KV heads: a selection that indexed dims 0 and 1 (batch, heads) would not fail, just be wrong
    return LlamaForCausalLM(tiny_llama_config(head_dim=8, layers=2, kv_heads=3, heads=6)).eval()


def run(model, ids, cache, steps=3):
    """Prefill, then greedy steps; the logits of every step."""
    out = model(ids, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        logits.append(model(nxt, past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("attention", ["fused", "dequantize"])
def test_forward_with_autograd_works_and_equals_the_no_grad_path(model, attention):
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = run(model, ids, QuantizedKVCache(model.config, "int4", attention=attention, **OPTIONS))
        dense = run(model, ids, QuantizedKVCache(model.config, "int4", attention="dequantize", **OPTIONS))
    cache = QuantizedKVCache(model.config, "int4", attention=attention, **OPTIONS)
    with torch.enable_grad():
        logits = run(model, ids, cache)
        assert logits.requires_grad
        logits.sum().backward()
    # with gradients the history is read dense (the fused kernels have no backward): the dequantize path's values
    torch.testing.assert_close(logits.detach(), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.detach(), reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    grad = model.model.layers[-1].self_attn.k_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad()
    for layer in cache.layers:  # the cache keeps no graph alive
        assert not any(t.requires_grad for t in (layer.residual_keys, layer.residual_values, layer.sink_keys))


@pytest.mark.parametrize(
    "indices", [(0, 2), [0, 2], torch.tensor([0, 2]), torch.tensor([True, False, True, False]), (-4, 2)],
    ids=["tuple", "list", "tensor", "mask", "negative"],
)
def test_batch_select_indices_selects_batch_rows_like_dynamic_cache(model, indices):
    ids = torch.randint(0, 128, (4, 21), generator=torch.Generator().manual_seed(2))
    ours, dynamic = QuantizedKVCache(model.config, "int8", **OPTIONS), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=ours)
        model(ids, past_key_values=dynamic)
        before = [layer.dequantized() for layer in ours.layers]
        ours.batch_select_indices(indices)
        dynamic.batch_select_indices(torch.tensor([0, 2]))
        for layer, (keys, values), dyn in zip(ours.layers, before, dynamic.layers):
            after = layer.dequantized()
            assert torch.equal(after[0], keys[[0, 2]]) and torch.equal(after[1], values[[0, 2]])
            assert after[0].shape == dyn.keys.shape and (after[0] - dyn.keys).abs().max() < 0.05
        # rows are quantized independently: the selected cache continues as a fresh one of rows 0 and 2
        fresh = QuantizedKVCache(model.config, "int8", **OPTIONS)
        model(ids[[0, 2]], past_key_values=fresh)
        step = torch.tensor([[5], [7]])
        torch.testing.assert_close(
            model(step, past_key_values=ours).logits, model(step, past_key_values=fresh).logits, rtol=0, atol=1e-6
        )


def test_batch_select_indices_refuses_rows_out_of_range(model):
    cache = QuantizedKVCache(model.config, "int8", **OPTIONS)
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 9)), past_key_values=cache)
    with pytest.raises(ValueError, match=r"`indices` \[0, 2\] are out of range for a batch of 2"):
        cache.batch_select_indices((0, 2))
    with pytest.raises(ValueError, match="a batch mask has to have 2 entries"):
        cache.batch_select_indices(torch.tensor([True, False, True]))


def test_an_empty_batch_is_refused():
    cache = create_quantized_kv_cache("int8", num_layers=1, **OPTIONS)
    empty = torch.zeros(0, 2, 4, 8)
    with pytest.raises(ValueError, match=r"layer 0: the batch is empty \(key_states of shape \(0, 2, 4, 8\)\)"):
        cache.update(empty, empty, 0)


def test_a_device_change_between_steps_is_refused():
    cache = create_quantized_kv_cache("int8", num_layers=1, **OPTIONS)
    cache.update(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 0)
    elsewhere = torch.zeros(1, 2, 1, 8, device="meta")
    with pytest.raises(ValueError, match=r"layer 0: got key/value states on meta/meta but this layer holds its tokens on cpu"):
        cache.update(elsewhere, elsewhere, 0)
    assert cache.get_seq_length() == 4


@pytest.mark.parametrize("bad", [True, False, 1.0, "0", -1])
def test_layer_idx_has_to_be_an_int_in_range(bad):
    cache = create_quantized_kv_cache("int8", num_layers=2, **OPTIONS)
    kv = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=rf"`layer_idx` has to be in \[0, 1\] but got {bad!r}"):
        cache.update(kv, kv, bad)
