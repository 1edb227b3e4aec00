"""vLLM's process layouts: the default engine (scheduler and worker in their own processes) and the OpenAI server.

Each starts a fresh interpreter; the store is then read over its socket from this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from hf_kvcache_plugin.integrations.vllm_store import connect_store

from .conftest import MATCHABLE, PROMPTS

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "vllm.yaml"
STARTUP_S = 600  # first start on 2 shared cores


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(REPO))
    return env


def test_the_default_multiprocess_engine_shares_one_store(model_dir, tmp_path, reference):
    address = str(tmp_path / "store.sock")
    result = subprocess.run(
        [sys.executable, "-m", "tests_vllm.default_engine", str(model_dir), address, "engine-mp"],
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=STARTUP_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    report = json.loads(line.removeprefix("RESULT "))
    (first,), (second,) = report["passes"]
    assert first == [reference[0][0][:8], 0]
    assert second == [reference[0][0][:8], MATCHABLE]
    # the worker holds the store, apart from the process that made the LLM (and from the scheduler's)
    assert report["store_pid"] != report["client_pid"]
    assert report["stats"]["entries"] == MATCHABLE // 128
    assert report["stats"]["hit_chunks"] >= MATCHABLE // 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def api_server(model_dir, tmp_path):
    port, address, engine_id = free_port(), str(tmp_path / "api.sock"), "engine-api"
    kv = {
        "kv_connector": "HFKVCacheConnector",  # by name: the entry point registers it
        "kv_role": "kv_both",
        "engine_id": engine_id,
        "kv_connector_extra_config": {"config": str(CONFIG), "store_address": address},
    }
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--port", str(port),
        "--dtype", "float32", "--block-size", "128", "--max-model-len", "1024", "--enforce-eager",
        "--no-enable-prefix-caching", "--kv-transfer-config", json.dumps(kv),
    ]  # fmt: skip
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, cwd=REPO, env=environment(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        yield url, str(model_dir), address, engine_id
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_the_openai_api_server_serves_hits_from_the_store(api_server, reference):
    url, model, address, engine_id = api_server

    def complete() -> list[int]:
        body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "return_token_ids": True}
        response = requests.post(f"{url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["token_ids"]

    first, second = complete(), complete()
    assert first == second == reference[0][0][:8]
    stats = connect_store(address, engine_id.encode(), timeout_s=10).stats()
    assert stats["entries"] == MATCHABLE // 128
    assert stats["hit_chunks"] >= MATCHABLE // 128
