"""HFKVCacheConnector at INT8 inside vLLM (engine in this process): hits, exact load-back, budget."""

from __future__ import annotations

import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import pytest
import torch

from hf_kvcache_plugin.blocks import BlockCodec

from .conftest import BLOCK, MATCHABLE, NEW_TOKENS, PROMPTS, close_llm, generate, kv_transfer, make_llm, run_twice, store_of

LAYERS, HEADS, HEAD_DIM, GROUP = 2, 2, 64, 32  # tiny_model's shape; group size set in kv_transfer


def chunk_nbytes(bits: int) -> int:
    """One stored chunk, exactly: keys per channel and values per token, both layers, fp16 scales and zeros."""
    per_block = sum(
        BlockCodec(bits, GROUP, axis, scale_dtype=torch.float16).block_nbytes(1, HEADS, HEAD_DIM, torch.float32)
        for axis in ("channel", "token")
    )
    return LAYERS * (BLOCK // GROUP) * per_block


@pytest.fixture(scope="module")
def int8_llm(model_dir, reference):
    # room for exactly three chunks: the budget test overflows it
    llm = make_llm(model_dir, kv_transfer("int8", 3 * chunk_nbytes(8) / 2**20))
    yield llm
    close_llm(llm)


def test_a_repeated_prompt_reports_its_matched_tokens(int8_llm):
    store = store_of(int8_llm)
    store.clear()
    (first,), (second,) = run_twice(int8_llm, PROMPTS[:1])
    assert first[1] == 0
    assert second[1] == MATCHABLE == 256
    assert len(store) == MATCHABLE // BLOCK
    assert store.stats()["hit_chunks"] >= MATCHABLE // BLOCK


def test_int8_load_back_gives_the_output_without_the_connector(int8_llm, reference):
    for prompt, expected in zip(PROMPTS, reference):
        store_of(int8_llm).clear()
        (first,), (second,) = run_twice(int8_llm, [prompt])
        assert second[1] == MATCHABLE
        assert first[0] == expected[0]
        assert second[0] == expected[0]


def test_vllm_attends_to_what_is_loaded(int8_llm, reference):
    """Noise in the stored codes changes the output: the hit is read, not recomputed."""
    store = store_of(int8_llm)
    store.clear()
    generate(int8_llm, PROMPTS[:1], NEW_TOKENS)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # the worker made the entries inside vLLM's forward pass
        for info in store.entry_infos():
            entry = store.get(info.key)
            for q in entry.keys + entry.values:
                q.data.copy_(torch.randint(0, 256, q.data.shape, generator=generator, dtype=torch.uint8))
    ((tokens, cached),) = generate(int8_llm, PROMPTS[:1], NEW_TOKENS)
    assert cached == MATCHABLE
    assert tokens != reference[0][0]


def test_the_byte_budget_is_enforced(int8_llm):
    store = store_of(int8_llm)
    store.clear()
    evictions = store.stats()["evictions"]
    generate(int8_llm, PROMPTS[:2], NEW_TOKENS)  # 4 chunks for room of 3
    assert store.max_bytes == 3 * chunk_nbytes(8)
    assert len(store) == 3
    assert store.used_bytes == 3 * chunk_nbytes(8)
    assert store.stats()["evictions"] - evictions == 1
    assert store.accounting_problems() == []
    # the chain that lost its last chunk is served up to the chunk it kept
    cached = sorted(c for _, c in generate(int8_llm, PROMPTS[:2], NEW_TOKENS))
    assert cached == [BLOCK, 2 * BLOCK]
