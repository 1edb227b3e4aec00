"""Two vLLM instances sharing their tiers through our coordinator: instance 0 (engine in this process) serves a
prompt; instance 1 (a process of its own) then gets it from its tier, and its output is vLLM's own (INT8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from .cluster_instance import instance_kv
from .conftest import BLOCK, MATCHABLE, NEW_TOKENS, PROMPTS, close_llm, generate, make_llm, service_of
from .test_processes import REPO, STARTUP_S, environment, free_port


def test_a_prefix_served_by_one_instance_is_a_hit_of_the_other(model_dir, tmp_path, reference):
    port = free_port()
    log_path = tmp_path / "instance1.log"
    log = open(log_path, "w")
    other = subprocess.Popen(
        [sys.executable, "-m", "tests_vllm.cluster_instance", str(model_dir), str(port), str(tmp_path)],
        cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    llm = None
    try:
        llm = make_llm(model_dir, instance_kv(0, port, tmp_path))
        served = generate(llm, PROMPTS[:1], NEW_TOKENS)
        (tmp_path / "served").touch()
        code = other.wait(timeout=STARTUP_S)
        here = service_of(llm).tier_stats()
    finally:
        if other.poll() is None:
            other.kill()
        log.close()
        if llm is not None:
            close_llm(llm)
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    report = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))
    assert served == [(reference[0][0], 0)]  # instance 0 computed it
    assert report["passes"] == [[reference[0][0], MATCHABLE]]  # instance 1 loaded it from its tier
    cluster = report["tier"]["cluster"]
    assert cluster["migrated_in_entries"] == MATCHABLE // BLOCK and cluster["error"] is None
    assert here["cluster"]["migrated_out_entries"] == MATCHABLE // BLOCK
    assert report["tier"]["requests"] == {"requests": 1, "tier_hits": 1, "tier_tokens": MATCHABLE}
