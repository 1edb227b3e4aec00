"""vLLM tests: run in their own venv (.ci/run builds it), not by the main suite (testpaths = tests).

One process, vLLM's engine in it (VLLM_ENABLE_V1_MULTIPROCESSING=0), LLMs
built one after another on one tiny random Llama (one at a time: vLLM keeps
its KV connector in a process-wide global); test_processes.py starts the
multi-process default and the OpenAI server in subprocesses, test_instances.py
a second instance (cluster_instance.py).
"""

from __future__ import annotations

import gc
import os
import random

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest

from .tiny_model import build_tiny_llama

BLOCK = 128  # vLLM's CPU block size; our chunk size
PROMPT_LEN = 300  # two whole chunks and a tail; vLLM computes at least the last prompt token itself
MATCHABLE = (PROMPT_LEN - 1) // BLOCK * BLOCK
NEW_TOKENS = 16


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(length)]


PROMPTS = [random_prompt(PROMPT_LEN, seed) for seed in range(4)]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def reference(model_dir):
    """vLLM without a connector: what each of PROMPTS should generate."""
    llm = make_llm(model_dir)
    try:
        return generate(llm, PROMPTS, NEW_TOKENS)
    finally:
        close_llm(llm)


def kv_transfer(quant_type: str | None, max_size_mb: float, group_size: int = 32, **extra):
    """Our connector's --kv-transfer-config; ``quant_type=None``: the full-precision tier."""
    from vllm.config import KVTransferConfig

    settings = {"prefix_store": {"max_size_mb": max_size_mb}, **extra}
    if quant_type is None:
        settings["full_precision"] = True
    else:
        settings["cache"] = {"quant_type": quant_type, "group_size": group_size}
    return KVTransferConfig(kv_connector="HFKVCacheConnector", kv_role="kv_both", kv_connector_extra_config=settings)


def make_llm(model_dir, kv_transfer_config=None, prefix_caching: bool = False):
    from vllm import LLM

    return LLM(
        model=str(model_dir),
        dtype="float32",
        enable_prefix_caching=prefix_caching,  # off unless a test says: every hit is ours
        kv_transfer_config=kv_transfer_config,
        max_model_len=1024,
        block_size=BLOCK,
        enforce_eager=True,
        max_num_seqs=8,
        max_num_batched_tokens=2048,
    )


def close_llm(llm) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def generate(llm, prompts: list[list[int]], max_tokens: int = 8):
    """[(generated token ids, prompt tokens vLLM did not compute)] per prompt, greedy."""
    from vllm import SamplingParams

    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False
    )
    return [(list(o.outputs[0].token_ids), o.num_cached_tokens) for o in outputs]


def run_twice(llm, prompts, max_tokens: int = NEW_TOKENS):
    """Each prompt computed (and saved), then served again from the store."""
    return generate(llm, prompts, max_tokens), generate(llm, prompts, max_tokens)


def service_of(llm):
    """The StoreService (store, sizer, cluster) that the worker side hosts (in this process: engine in-process)."""
    from hf_kvcache_plugin.integrations.vllm_connector import store_address
    from hf_kvcache_plugin.integrations.vllm_store import connect_store

    return connect_store(*store_address(llm.llm_engine.vllm_config), timeout_s=5)


def store_of(llm):
    """The PrefixStore that the worker side hosts."""
    return service_of(llm).store


def prefix_agreement(tokens: list[int], expected: list[int]) -> int:
    """Generated tokens equal to the reference's before the first difference."""
    return next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), len(expected))
