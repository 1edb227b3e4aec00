"""Instance 1 of test_instances.py's two vLLM instances, in a fresh interpreter (its engine in that process).

Usage: python -m tests_vllm.cluster_instance MODEL_DIR STORE_PORT WORKDIR
Waits until instance 0 (the test's process) served PROMPTS[0] and the chain has reached this instance's tier
through the coordinator; then serves PROMPTS[0] and prints one JSON line: its pass and its tier's figures.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

WAIT_S = 300


def instance_kv(rank: int, port: int, workdir: Path):
    """The connector's config of instance ``rank`` of two sharing their tiers (INT8)."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="HFKVCacheConnector",
        kv_role="kv_both",
        engine_id=f"instance{rank}",
        kv_connector_extra_config={
            "cache": {"quant_type": "int8", "group_size": 32},
            "distributed": {"store_port": port, "replication_factor": 2, "heartbeat_interval_s": 0.2,
                            "heartbeat_timeout_s": 10.0},
            "instance_rank": rank,
            "instances": 2,
            "store_address": str(workdir / f"instance{rank}.sock"),
        },
    )  # fmt: skip


def wait_until(ready, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {WAIT_S} s for {what}")
        time.sleep(0.1)


def main() -> None:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from .conftest import BLOCK, MATCHABLE, NEW_TOKENS, PROMPTS, generate, make_llm, service_of

    model_dir, port, workdir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    llm = make_llm(model_dir, instance_kv(1, port, workdir))
    service = service_of(llm)
    wait_until((workdir / "served").exists, "instance 0 to serve")
    arrived = lambda: service.tier_stats()["cluster"].get("migrated_in_entries", 0) >= MATCHABLE // BLOCK  # noqa: E731
    wait_until(arrived, "the chain to reach this instance")
    passes = generate(llm, PROMPTS[:1], NEW_TOKENS)
    print("RESULT " + json.dumps({"passes": passes, "tier": service.tier_stats()}, default=str), flush=True)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
