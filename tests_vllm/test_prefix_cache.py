"""The tier behind vLLM's own prefix cache (INT8): it gives only the tokens vLLM lacks."""

from __future__ import annotations

import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import pytest

from .conftest import BLOCK, MATCHABLE, NEW_TOKENS, PROMPTS, close_llm, generate, kv_transfer, make_llm, service_of


@pytest.fixture(scope="module")
def cached_llm(model_dir, reference):
    llm = make_llm(model_dir, kv_transfer("int8", 16), prefix_caching=True)
    yield llm
    close_llm(llm)


def test_the_tier_adds_only_what_vllms_prefix_cache_lacks(cached_llm, reference):
    llm, store = cached_llm, service_of(cached_llm).store
    requests = lambda: service_of(llm).tier_stats()["requests"]  # noqa: E731
    prompt = PROMPTS[0]
    # its first chunk with another continuation: a prompt that shares one block with `prompt`
    sibling = prompt[:BLOCK] + PROMPTS[1][BLOCK:]
    ((tokens, cached),) = generate(llm, [prompt], NEW_TOKENS)
    assert (tokens, cached) == (reference[0][0], 0)
    assert len(store) == MATCHABLE // BLOCK

    # vLLM's cache holds the whole prefix: the tier gives nothing
    before = requests()
    ((tokens, cached),) = generate(llm, [prompt], NEW_TOKENS)
    assert (tokens, cached) == (reference[0][0], MATCHABLE)
    assert requests()["tier_tokens"] == before["tier_tokens"]

    # vLLM's cache emptied: the tier gives the whole prefix
    assert llm.reset_prefix_cache()
    before = requests()
    ((tokens, cached),) = generate(llm, [prompt], NEW_TOKENS)
    assert (tokens, cached) == (reference[0][0], MATCHABLE)
    assert requests()["tier_tokens"] - before["tier_tokens"] == MATCHABLE

    # vLLM's cache holds the first block only (from the sibling): the tier gives the second, loaded after it
    assert llm.reset_prefix_cache()
    generate(llm, [sibling], NEW_TOKENS)
    before = requests()
    ((tokens, cached),) = generate(llm, [prompt], NEW_TOKENS)
    assert (tokens, cached) == (reference[0][0], MATCHABLE)
    assert requests()["tier_tokens"] - before["tier_tokens"] == MATCHABLE - BLOCK
