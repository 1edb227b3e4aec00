"""Drops in a left-padded batch: each row keeps its own first tokens as sinks and loses its padding first, so it
generates what it does alone with the same real tokens dropped."""

from __future__ import annotations

import pytest
import torch

from hf_kvcache_plugin import QuantizedKVCache
from hf_kvcache_plugin._compat import GENERATE_CACHE_KWARG
from hf_kvcache_plugin.padding import left_padding_counts

G, SINKS, NEW = 8, 8, 24
SETTINGS = dict(group_size=G, residual_length=8, sink_tokens=SINKS)
PROMPTS = (
    "Once upon a time, there was a little girl named Lily. She loved to play in the park with her red ball.",
    "Tom had a big red truck. He liked to push it in the sand.",
    "The cat sat on the mat and looked at the sun.",
)


def drop_to(cache: QuantizedKVCache, tokens: int) -> None:
    """Drop the oldest blocks of every layer until ``tokens`` are dropped (what a budget drop does)."""
    for layer in cache.layers:
        blocks = (tokens - layer.dropped_tokens) // G
        if blocks > 0:
            layer.quantized_keys.drop_oldest(blocks)
            layer.quantized_values.drop_oldest(blocks)
            layer.dropped_tokens += blocks * G


def padded_batch(tok) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The prompts left padded to a common length, each cut to a multiple of G tokens so that padding fills whole
    blocks (the rows' real tokens then share blocks with nothing else, as ``app.batcher`` arranges)."""
    rows = [tok(p, return_tensors="pt").input_ids[0] for p in PROMPTS]
    rows = [r[: len(r) // G * G] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask, rows


def budget_mb(config, batch: int) -> float:
    """Room for the sinks, the window's buffers and one INT8 block per stream in every layer: a block is dropped
    every G tokens from the first decode step on."""
    heads, dim = config.num_key_value_heads, config.head_dim
    dense = batch * heads * (SINKS + SETTINGS["residual_length"] + G) * 2 * dim * 4
    block = batch * heads * dim * (G + 2 * 2)  # int8 codes, fp16 scale and zero per group of G
    return config.num_hidden_layers * (dense + 2 * block) / 2**20


def test_each_row_of_a_padded_batch_generates_what_it_does_alone_with_the_same_drops(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids, mask, rows = padded_batch(tok)
    padding = (mask == 0).sum(1).tolist()
    assert padding[0] == 0 and min(padding[1:]) >= SINKS  # padded rows' first sink slots are all padding
    with torch.inference_mode():
        cache = QuantizedKVCache(model.config, "int8", budget_policy="drop",
                                 max_size_mb=budget_mb(model.config, len(rows)), **SETTINGS)  # fmt: skip
        cache.set_left_padding(mask)
        offsets = []  # tokens dropped after each forward step (a step drops before it appends)
        hook = model.register_forward_hook(lambda *_: offsets.append(cache.layers[0].dropped_tokens))
        try:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 **{GENERATE_CACHE_KWARG: cache})  # fmt: skip
        finally:
            hook.remove()
        # the drops went past every row's padding, and a block into its real tokens
        assert offsets[-1] >= max(padding) + G
        for r, row in enumerate(rows):
            # alone: the same real tokens dropped (the batch's drops less this row's padding) before each step
            alone = QuantizedKVCache(model.config, "int8", **SETTINGS)
            tokens, step_input = [], row[None]
            for offset in offsets:
                drop_to(alone, max(0, offset - padding[r]))
                next_token = model(step_input, **{GENERATE_CACHE_KWARG: alone}).logits[0, -1].argmax()
                tokens.append(int(next_token))
                step_input = next_token.view(1, 1)
            assert tokens == out[r, ids.shape[1]:].tolist(), r


def test_without_declared_padding_the_padded_rows_read_padding_as_sinks(model_and_tokenizer):
    """The control: the same batch with no padding declared goes wrong in a padded row (what
    ``set_left_padding`` fixes), while the unpadded row is unaffected. Dequantized attention here (the other test
    runs the fused path): a drop happens before the step's mask is built, so the mask fits what is attended to."""
    model, tok = model_and_tokenizer
    ids, mask, _ = padded_batch(tok)
    outs = []
    with torch.inference_mode():
        unbounded = QuantizedKVCache(model.config, "int8", **SETTINGS)
        model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                       **{GENERATE_CACHE_KWARG: unbounded})  # fmt: skip
        budget = 0.75 * unbounded.get_stats()["total_bytes"] / 2**20  # sinks and window take 57%
        for declare in (True, False):
            cache = QuantizedKVCache(model.config, "int8", budget_policy="drop", max_size_mb=budget,
                                     attention="dequantize", **SETTINGS)  # fmt: skip
            if declare:
                cache.set_left_padding(mask)
            outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                       do_sample=False, **{GENERATE_CACHE_KWARG: cache}))  # fmt: skip
    assert torch.equal(outs[0][0], outs[1][0])
    assert not torch.equal(outs[0][1:], outs[1][1:])


def test_padding_is_read_from_a_left_padded_mask_and_follows_batch_changes():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    assert left_padding_counts(mask).tolist() == [2, 0, 1]
    assert left_padding_counts([3, 0]).tolist() == [3, 0] and left_padding_counts(None) is None
    with pytest.raises(ValueError, match=r"rows \[0\] are not left padded"):
        left_padding_counts(torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match=r"has to be \[batch, length\]"):
        left_padding_counts(torch.ones(4))
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1 \\(tokens\\) only"):
        left_padding_counts(torch.tensor([[0, 2]]))
    cache = QuantizedKVCache(num_layers=1, num_heads=2, head_dim=8, **SETTINGS)
    cache.set_left_padding(mask)
    cache.update(torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8), 0)
    cache.batch_select_indices((2, 0))
    assert cache._left_padding.tolist() == [1, 2]
    cache.batch_repeat_interleave(2)
    assert cache._left_padding.tolist() == [1, 1, 2, 2]
    cache.reorder_cache(torch.tensor([3, 2, 1, 0]))
    assert cache._left_padding.tolist() == [2, 2, 1, 1]
    cache.reset()
    assert cache._left_padding is None
