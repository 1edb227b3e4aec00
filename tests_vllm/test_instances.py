"""Two vLLM instances (processes) sharing their tiers through our coordinator: instance 0's prefix is a hit
of instance 1, and instance 1's output is vLLM's own (INT8)."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import BLOCK, MATCHABLE
from .test_processes import REPO, STARTUP_S, environment, free_port


def test_a_prefix_served_by_one_instance_is_a_hit_of_the_other(model_dir, tmp_path, reference):
    port = free_port()
    logs = [open(tmp_path / f"instance{rank}.log", "w") for rank in range(2)]
    instances = [
        subprocess.Popen(
            [sys.executable, "-m", "tests_vllm.cluster_instance", str(model_dir), str(rank), str(port), str(tmp_path)],
            cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for rank, log in enumerate(logs)
    ]
    try:
        codes = [instance.wait(timeout=STARTUP_S) for instance in instances]
    finally:
        for instance in instances:
            if instance.poll() is None:
                instance.kill()
        for log in logs:
            log.close()
    texts = [(tmp_path / f"instance{rank}.log").read_text() for rank in range(2)]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in texts)
    first, second = (
        json.loads(next(line for line in text.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))
        for text in texts
    )
    assert first["passes"] == [[reference[0][0], 0]]  # instance 0 computed it
    assert second["passes"] == [[reference[0][0], MATCHABLE]]  # instance 1 loaded it from its tier
    cluster = second["tier"]["cluster"]
    assert cluster["migrated_in_entries"] == MATCHABLE // BLOCK and cluster["error"] is None
    assert first["tier"]["cluster"]["migrated_out_entries"] == MATCHABLE // BLOCK
    assert second["tier"]["requests"] == {"requests": 1, "tier_hits": 1, "tier_tokens": MATCHABLE}
