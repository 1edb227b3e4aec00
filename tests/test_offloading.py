"""``QuantizedKVCache(offloading=True)`` on a CPU-only machine: what can be checked without CUDA.

transformers' offloading (``Cache.update`` with ``offloading=True``) syncs CUDA
streams, so it runs on CUDA only; this machine has none. What is checked here:
that a layer's ``prefetch`` / ``offload`` move every tensor the layer holds
(quantized tiers, exact fallback blocks, sinks, residual window; a tensor left
behind would keep accelerator memory or crash the next step on a device
mismatch), with the meta device standing in for the accelerator; which path
``update`` takes (transformers' offloading for accelerator tensors, the layer
directly for CPU tensors); and which layers transformers' ``Cache.offload``
moves when ``offload_only_non_sliding`` keeps sliding layers resident. The
stream synchronisation and the copies on a real GPU are not tested here.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.cache_utils import Cache

from hf_kvcache_plugin import QuantizedKVCache
from hf_kvcache_plugin.blocks import QuantizedBlocks
from hf_kvcache_plugin.layer import QuantizedKVLayer
from hf_kvcache_plugin.quantization import QuantizedTensor
from hf_kvcache_plugin.sliding_layer import QuantizedSlidingWindowLayer


def _tensors(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor reachable from a layer's attributes (blocks, tiers, dicts, lists, tuples included)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _tensors(value, seen)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in _tensors(value, seen)]
    if isinstance(obj, (QuantizedKVLayer, QuantizedBlocks, QuantizedTensor)):
        return [t for value in vars(obj).values() for t in _tensors(value, seen)]
    return []


def _filled(layer_class=QuantizedKVLayer, **kwargs) -> QuantizedKVLayer:
    """A layer holding every kind of tensor: sinks, an aged INT4 and a recent INT8 tier, an exact fallback block
    (a NaN block cannot be quantized) and the residual window."""
    settings = dict(key_bits=8, value_bits=8, group_size=4, residual_length=4, aged_bits=4, recent_tokens=8)
    layer = layer_class(**settings, **kwargs)
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 30, 8, generator=generator), torch.randn(1, 2, 30, 8, generator=generator)
    keys[0, 1, 25] = float("nan")
    layer.update(keys, values)
    for _ in range(3):  # decode steps: the window's buffers exist too
        layer.update(torch.randn(1, 2, 1, 8, generator=generator), torch.randn(1, 2, 1, 8, generator=generator))
    return layer


@pytest.mark.parametrize("layer_class, kwargs", [
    (QuantizedKVLayer, {"sink_tokens": 2}), (QuantizedSlidingWindowLayer, {"sliding_window": 24}),
])
def test_prefetch_and_offload_move_every_tensor_the_layer_holds(layer_class, kwargs):
    layer = _filled(layer_class, **kwargs)
    held = _tensors(layer)
    assert layer.quantized_keys.aged is not None and layer.quantized_keys.recent is not None
    assert layer.quantized_keys.full_precision_blocks
    assert len(held) >= 12 and all(t.device.type == "cpu" for t in held)
    # the layer's home device is an accelerator (meta stands in for it): prefetch brings every tensor there
    layer.device = torch.device("meta")
    layer.prefetch()
    assert {t.device.type for t in _tensors(layer)} == {"meta"}
    # offload sends every tensor to the CPU, without blocking the accelerator's stream
    moved = []

    def to(tensor, *args, **kwargs):
        moved.append((tensor, args, kwargs))
        return tensor

    with mock.patch.object(torch.Tensor, "to", to):
        layer.offload()
    assert {id(t) for t, _, _ in moved} == {id(t) for t in _tensors(layer)}
    assert all(args == ("cpu",) and kwargs == {"non_blocking": True} for _, args, kwargs in moved)


def test_update_takes_transformers_offloading_path_for_accelerator_tensors_only():
    cache = QuantizedKVCache(None, "int8", num_layers=2, group_size=4, residual_length=4, offloading=True)
    assert cache.offloading and not cache.uses_fused_attention
    with mock.patch.object(Cache, "update", autospec=True, return_value=("keys", "values")) as offloading_update:
        on_accelerator = torch.empty(1, 2, 3, 8, device="meta")
        assert cache.update(on_accelerator, on_accelerator, 0) == ("keys", "values")
        assert offloading_update.call_count == 1  # the stream sync, prefetch of the next layer and offload
        on_cpu = torch.randn(1, 2, 3, 8)
        keys, values = cache.update(on_cpu, on_cpu, 1)
        assert offloading_update.call_count == 1  # a CPU tensor is where offloading would put it: the layer directly
    assert torch.equal(keys, on_cpu) and cache.layers[1].get_seq_length() == 3


@pytest.mark.parametrize("only_non_sliding", [True, False])
def test_offload_only_non_sliding_keeps_sliding_layers_resident(only_non_sliding):
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention"] * 2)  # fmt: skip
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    cache = QuantizedKVCache(config, "int8", group_size=8, residual_length=8, offloading=True,
                             offload_only_non_sliding=only_non_sliding)
    assert cache.is_sliding == [True, False, True, False]
    with torch.no_grad():
        model(torch.randint(3, 64, (1, 24), generator=torch.Generator().manual_seed(1)), past_key_values=cache)
    offloaded = []
    for idx, layer in enumerate(cache.layers):
        with mock.patch.object(layer, "offload", lambda idx=idx: offloaded.append(idx)):
            cache.offload(idx, cache.only_non_sliding)
    assert offloaded == ([1, 3] if only_non_sliding else [0, 1, 2, 3])
