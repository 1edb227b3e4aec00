"""`transformers serve` on a model folder carrying the custom_generate recipe, asked by the official `openai` client.

The server is transformers' own (``python -m transformers.cli.transformers serve FOLDER --trust-remote-code``),
bound to 127.0.0.1 on a free port, under a deadline after which it stops by itself (``timeout``) even if this
test process dies; the test stops it first. The folder is a copy of the embedded stories260K with the recipe
written by ``write_custom_generate``, plus a wrapper around the recipe's ``generate`` that writes the cache it
built (class, settings, ``get_stats()``) to a JSON file: the proof that the served answer came through this
package's cache, not a ``DynamicCache``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kvcache_plugin import QuantizedKVCache
from hf_kvcache_plugin.generate_recipe import recipe_cache_config, write_custom_generate

from .conftest import REAL_MODEL, REPO

SETTINGS = {"quant_type": "int4", "group_size": 8, "residual_length": 16}
PROMPT, NEW_TOKENS = "Once upon a time", 24  # 5 + 24 tokens: blocks leave the 16-token exact window
_SERVER_LIFETIME_S = 600  # the server's own deadline (it may build the CPU kernel on its first request)
_WAIT_S = 300  # every wait below is bounded

# appended to the served recipe: the same generate, asked for its cache, which goes to a file
_STATS_WRAPPER = """

_recipe_generate = generate


def generate(*args, model, **kwargs):
    import json as _json

    kwargs["return_dict_in_generate"] = True
    out = _recipe_generate(*args, model=model, **kwargs)
    cache = out.past_key_values
    record = {{"cache": type(cache).__name__, "quant_type": getattr(getattr(cache, "cache_config", None), "quant_type",
              None), "stats": cache.get_stats() if hasattr(cache, "get_stats") else None}}
    with open({path!r}, "w") as f:
        _json.dump(record, f)
    return out.sequences
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _transformers_serve(model_dir: Path, log_path: Path, env: dict):
    port = _free_port()
    command = [
        "timeout", "-s", "TERM", "-k", "10", str(_SERVER_LIFETIME_S),
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--trust-remote-code",
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + _WAIT_S
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"transformers serve did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)  # the server and the model's process it spawned
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_transformers_serve_answers_the_openai_client_through_the_recipe(tmp_path):
    model_dir = tmp_path / "stories260K"
    shutil.copytree(REAL_MODEL, model_dir, ignore=shutil.ignore_patterns("README.md", "LICENSE"))
    recipe = write_custom_generate(model_dir) / "generate.py"
    stats_path = tmp_path / "served_cache.json"
    recipe.write_text(recipe.read_text() + _STATS_WRAPPER.format(path=str(stats_path)))
    # the folder's settings, as a user ships them: generation_config.json's `kvcache`
    generation_config = json.loads((model_dir / "generation_config.json").read_text())
    generation_config["kvcache"] = SETTINGS
    (model_dir / "generation_config.json").write_text(json.dumps(generation_config))

    # our own greedy generate, in this process, with the same settings
    model = AutoModelForCausalLM.from_pretrained(REAL_MODEL).eval()
    tokenizer = AutoTokenizer.from_pretrained(REAL_MODEL)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    reference_cache = QuantizedKVCache(model.config, cache_config=recipe_cache_config(SETTINGS))
    with torch.no_grad():
        reference = model.generate(ids, past_key_values=reference_cache, max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, do_sample=False)
    expected = tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    with _transformers_serve(model_dir, tmp_path / "server.log", env) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=_WAIT_S, max_retries=0)
        answer = client.completions.create(
            model=str(model_dir), prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0,
            # a request's `generation_config` becomes generate's keywords: a fixed length, as the reference
            extra_body={"generation_config": json.dumps({"min_new_tokens": NEW_TOKENS})},
        )
    assert answer.choices[0].text == expected
    assert answer.usage.completion_tokens == NEW_TOKENS
    served = json.loads(stats_path.read_text())
    assert served["cache"] == "QuantizedKVCache" and served["quant_type"] == "int4"
    # the same bytes as the reference cache: the same settings over the same tokens, blocks quantized
    assert served["stats"]["quantized_bytes"] > 0
    assert served["stats"] == json.loads(json.dumps(reference_cache.get_stats()))
