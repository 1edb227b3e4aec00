"""Run by test_instances.py: one vLLM instance (its engine in this process) whose tier joins a cluster of two.

Usage: python -m tests_vllm.cluster_instance MODEL_DIR RANK STORE_PORT WORKDIR
Instance 0 serves PROMPTS[0], then stays (its coordinator sends the chain on) until WORKDIR/done.
Instance 1 waits until instance 0 served, and until the chain has reached its own store; then serves
PROMPTS[0] and writes WORKDIR/done. Each prints one JSON line: its passes and its tier's figures.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

WAIT_S = 300


def wait_until(ready, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {WAIT_S} s for {what}")
        time.sleep(0.1)


def main() -> None:
    from vllm.config import KVTransferConfig

    from .conftest import BLOCK, MATCHABLE, NEW_TOKENS, PROMPTS, generate, make_llm, service_of

    model_dir, rank, port, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    kv = KVTransferConfig(
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
    llm = make_llm(model_dir, kv)
    service = service_of(llm)
    if rank == 0:
        passes = generate(llm, PROMPTS[:1], NEW_TOKENS)
        (workdir / "served").touch()
        wait_until((workdir / "done").exists, "instance 1")
    else:
        wait_until((workdir / "served").exists, "instance 0 to serve")
        arrived = lambda: service.tier_stats()["cluster"].get("migrated_in_entries", 0) >= MATCHABLE // BLOCK  # noqa: E731
        wait_until(arrived, "the chain to reach this instance")
        passes = generate(llm, PROMPTS[:1], NEW_TOKENS)
        (workdir / "done").touch()
    report = {"passes": passes, "tier": service.tier_stats()}
    print("RESULT " + json.dumps(report, default=str), flush=True)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
