"""Run by test_processes.py in a fresh interpreter: an LLM with vLLM's default engine process.

Usage: python -m tests_vllm.default_engine MODEL_DIR STORE_ADDRESS ENGINE_ID
Prints one JSON line: each pass's (tokens, cached) and the store as seen over its socket from here.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the default: the engine core in its own process


def main() -> None:
    from vllm.config import KVTransferConfig

    from hf_kvcache_plugin.integrations.vllm_store import connect_store

    from .conftest import PROMPTS, generate, make_llm

    model_dir, address, engine_id = sys.argv[1:4]
    kv = KVTransferConfig(
        kv_connector="HFKVCacheConnector",
        kv_role="kv_both",
        engine_id=engine_id,
        kv_connector_extra_config={"cache": {"quant_type": "int8", "group_size": 32}, "store_address": address},
    )
    llm = make_llm(model_dir, kv)
    passes = [generate(llm, PROMPTS[:1]), generate(llm, PROMPTS[:1])]
    service = connect_store(address, engine_id.encode(), timeout_s=30)
    print(
        "RESULT " + json.dumps(
            {
                "passes": passes,
                "store_pid": service.host_pid(),
                "client_pid": os.getpid(),
                "stats": service.stats(),
            }
        ),
        flush=True,
    )
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
