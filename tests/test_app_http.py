"""`hf-kvcache serve --http`: the OpenAI-compatible API driven by the official `openai` client and plain httpx.

Each server is the real tiny model behind ``build_service``, bound to
127.0.0.1 on a free port in a thread and stopped by the fixture.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from hf_kvcache_plugin.app.cli import main
from hf_kvcache_plugin.app.http_api import create_app
from hf_kvcache_plugin.app.http_serve import ApiServer, api_keys, check_exposure
from hf_kvcache_plugin.app.models import load_model
from hf_kvcache_plugin.app.openai_protocol import FALLBACK_CHAT_TEMPLATE
from hf_kvcache_plugin.app.service import build_service
from hf_kvcache_plugin.app.stream_text import StreamedText
from hf_kvcache_plugin.config import ApiServerConfig, ConfigError, parse_config
from hf_kvcache_plugin.reuse.prefix_store import PrefixStore

from .conftest import REAL_MODEL


MODEL = "stories260K"
PROMPTS = ["Once upon a time", "Tom and Lily went to the park", "The little dog was sad because", "One day, a bird"]
_WAIT_S = 60  # every wait in these tests is bounded


@contextlib.contextmanager
def serving(config: dict | None = None, keys: tuple[str, ...] = (), **service_kwargs):
    """(base URL, service, model, tokenizer) of a server on 127.0.0.1:<free port>; stopped on exit."""
    model, tokenizer = load_model(str(REAL_MODEL), "cpu")
    plugin = parse_config(config or {})
    service = build_service(model, plugin, http=False, **service_kwargs)
    server = ApiServer(create_app(service, model, tokenizer, MODEL, plugin, list(keys)))
    try:
        server.start(timeout_s=_WAIT_S)
        yield server.url, service, model, tokenizer
    finally:
        server.stop(timeout_s=_WAIT_S)
        service.close()


def client(url: str, key: str = "none") -> openai.OpenAI:
    # no retries: a 429 or 503 has to reach the test as it was answered
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=_WAIT_S)


def greedy_reference(model, tokenizer, ids: list[int], new_tokens: int) -> str:
    """The continuation plain ``model.generate`` (DynamicCache, no server) gives."""
    with torch.inference_mode():
        out = type(model).generate(model, torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    full = tokenizer.decode(out[0], skip_special_tokens=True)
    return full[len(tokenizer.decode(ids, skip_special_tokens=True)) :]


def sample(service, name: str, **labels: str) -> float:
    return service.metrics.value(name, **labels) or 0.0


# ---------------------------------------------------------------------- the openai client
def test_completions_match_plain_generate_and_carry_usage():
    with serving({"prefix_store": {}}) as (url, _, model, tokenizer):
        api = client(url)
        assert [m.id for m in api.models.list().data] == [MODEL]
        answer = api.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=8, temperature=0)
        ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
        assert [c.text for c in answer.choices] == [greedy_reference(model, tokenizer, i, 8) for i in ids]
        assert [c.index for c in answer.choices] == [0, 1]
        assert {c.finish_reason for c in answer.choices} == {"length"}
        assert answer.usage.prompt_tokens == sum(len(i) for i in ids)
        assert answer.usage.completion_tokens == 16 and answer.usage.total_tokens == answer.usage.prompt_tokens + 16

        stop = api.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=[" little"])
        assert stop.choices[0].finish_reason == "stop"
        assert stop.choices[0].text == answer.choices[0].text.split(" little")[0]


def test_streamed_completion_is_the_whole_answer_in_pieces():
    with serving() as (url, _, _, _):
        api = client(url)
        whole = api.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=0)
        chunks = list(api.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True))
        texts = [c.choices[0].text for c in chunks if c.choices]
        assert len([t for t in texts if t]) > 1  # it streamed, not one block
        assert "".join(texts) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage == whole.usage


def test_streamed_chat_uses_the_fallback_template_when_the_tokenizer_has_none():
    messages = [{"role": "system", "content": "A short story."}, {"role": "user", "content": "Tell me about a cat"}]
    with serving() as (url, _, model, tokenizer):
        assert tokenizer.chat_template is None  # stories260K: the documented fallback applies
        stream = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                     stream=True)  # fmt: skip
        chunks = list(stream)
        ids = tokenizer.apply_chat_template(messages, chat_template=FALLBACK_CHAT_TEMPLATE,
                                            add_generation_prompt=True, tokenize=True)["input_ids"]  # fmt: skip
        assert tokenizer.decode(ids, skip_special_tokens=True) == "A short story.\n\nUser: Tell me about a cat\nAssistant:"
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == greedy_reference(model, tokenizer, ids, 8)
        assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.completion_tokens == 8
        whole = client(url).chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        assert whole.choices[0].message.content == text and whole.choices[0].message.role == "assistant"


def test_errors_come_in_openai_shape_with_their_status():
    config = {"serving": {"rate_limit": {"enabled": True, "burst": 4, "rate_per_s": 0.001},
                          "api": {"max_tokens": 16, "max_prompt_tokens": 12, "max_batch_size": 2}}}  # fmt: skip
    with serving(config, keys=("secret-1",)) as (url, _, _, _):
        with pytest.raises(openai.AuthenticationError) as bad_key:
            client(url, "wrong").completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert bad_key.value.status_code == 401 and bad_key.value.code == "invalid_api_key"
        assert "secret" not in str(bad_key.value.body)
        assert httpx.get(url + "/v1/models", timeout=_WAIT_S).status_code == 401  # no key at all

        api = client(url, "secret-1")
        for kwargs, param, words in [
            ({"prompt": "Hi", "max_tokens": 17}, "max_tokens", "at most 16"),
            ({"prompt": "Hi " * 20, "max_tokens": 2}, "prompt", "takes at most 12"),
            ({"prompt": "Hi", "temperature": 3}, "temperature", "less than or equal to 2"),
        ]:
            with pytest.raises(openai.BadRequestError) as bad:
                api.completions.create(model=MODEL, **kwargs)
            assert bad.value.status_code == 400 and bad.value.param == param and words in bad.value.message
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            api.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
        # the four requests with the right key took the four tokens of the bucket (401s take none)
        with pytest.raises(openai.RateLimitError) as limited:
            api.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert limited.value.status_code == 429 and limited.value.code == "rate_limit_exceeded"
        assert int(limited.value.response.headers["retry-after"]) >= 1
        assert [m.id for m in api.models.list().data] == [MODEL]  # listing models is not rate limited


def test_not_ready_is_503_and_the_probes_say_why():
    critical = lambda: 0.99  # noqa: E731 - memory 99% used: UNHEALTHY, not ready
    with serving(memory_reader=critical) as (url, _, _, _):
        with pytest.raises(openai.InternalServerError) as unready:
            client(url).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert unready.value.status_code == 503 and unready.value.code == "not_ready"
        assert "memory" in unready.value.message
        ready = httpx.get(url + "/readyz", timeout=_WAIT_S)
        assert ready.status_code == 503 and ready.json()["status"] == "unhealthy"
        assert httpx.get(url + "/healthz", timeout=_WAIT_S).status_code == 200  # alive all the same


# ---------------------------------------------------------------------- plain HTTP: probes, metrics, ids
def test_probes_metrics_and_request_ids_over_plain_http(caplog):
    with serving({"prefix_store": {}}) as (url, service, _, _), caplog.at_level(logging.INFO):
        ready = httpx.get(url + "/readyz", timeout=_WAIT_S)
        assert ready.status_code == 200 and {"memory", "breakers", "prefix_store"} <= set(ready.json()["checks"])
        assert httpx.get(url + "/healthz", timeout=_WAIT_S).json()["status"] in ("healthy", "degraded")
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0}
        answer = httpx.post(url + "/v1/completions", json=body, headers={"X-Request-Id": "probe-42"}, timeout=_WAIT_S)
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "probe-42"
        assert answer.json()["id"] == "cmpl-probe-42"
        assert httpx.get(url + "/nope", timeout=_WAIT_S).json()["error"]["message"] == "no route GET /nope"
        metrics = httpx.get(url + "/metrics", timeout=_WAIT_S)
        assert metrics.headers["content-type"].startswith("text/plain")
        assert 'hf_kvcache_http_requests_total{route="/v1/completions",status="200"} 1.0' in metrics.text
        assert 'hf_kvcache_requests_total{entry_point="http",outcome="served"} 1.0' in metrics.text
        assert 'hf_kvcache_http_rows_total{finish_reason="length"} 1.0' in metrics.text
    assert any(re.search(r"probe-42 POST /v1/completions -> 200", r.getMessage()) for r in caplog.records)
    assert any("cmpl-probe-42" in r.getMessage() for r in caplog.records if r.name.endswith("batcher"))


class _FailingStore(PrefixStore):
    """A prefix store whose lookups and inserts raise while ``failing`` is set."""

    failing = True

    def lookup(self, *args, **kwargs):
        if self.failing:
            raise OSError("injected store fault (lookup)")
        return super().lookup(*args, **kwargs)

    def put_chain(self, *args, **kwargs):
        if self.failing:
            raise OSError("injected store fault (insert)")
        return super().put_chain(*args, **kwargs)


def test_a_store_fault_recomputes_and_never_fails_the_request():
    config = {"prefix_store": {}, "serving": {"breaker": {"fail_max": 2, "reset_timeout_s": 600.0}}}
    with serving(config) as (url, _, model, tokenizer):
        healthy = client(url).completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0)
    store = _FailingStore.from_config(parse_config(config))
    with serving(config, store=store) as (url, service, _, _):
        answers = [client(url).completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0)
                   for _ in range(3)]  # fmt: skip
        assert [a.choices[0].text for a in answers] == [healthy.choices[0].text] * 3
        assert sample(service, "hf_kvcache_errors_total", component="prefix_store", kind="OSError") >= 2
        assert sample(service, "hf_kvcache_breaker_opens_total", breaker="prefix_store") == 1
        ready = httpx.get(url + "/readyz", timeout=_WAIT_S)
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"  # served, by recomputing
        assert sample(service, "hf_kvcache_requests_total", entry_point="http", outcome="failed") == 0


# ---------------------------------------------------------------------- concurrency and cancellation
def test_concurrent_requests_equal_the_same_requests_one_by_one():
    # residual_length 8: the cache quantizes within the 8 new tokens, so a row padded into another block layout
    # would change its tokens; a long batch wait: requests fired together surely meet in one batch
    config = {"cache": {"quant_type": "int2", "residual_length": 8}, "prefix_store": {"chunk_size": 8},
              "serving": {"api": {"batch_wait_ms": 400.0, "max_batch_size": 8}}}  # fmt: skip
    # prompt lengths 5, 13 | 18, 18 | 12 tokens: three groups equal modulo the group size 8
    prompts = ["Once upon a time", "The little dog was sad because",
               "Once upon a time, there was a little girl named Lily who", "The sun was hot, so Mom and Sue went to",
               "Tom and Lily went to the park"]  # fmt: skip
    requests = [dict(prompt=p, temperature=0) for p in prompts] + [
        dict(prompt=PROMPTS[0], temperature=2.0, seed=7, n=2),
        dict(prompt=PROMPTS[1], temperature=0.8, top_p=0.9, seed=11),
    ]
    with serving(config) as (url, service, _, _):
        api = client(url)

        def ask(kwargs: dict) -> list[str]:
            return [c.text for c in api.completions.create(model=MODEL, max_tokens=8, **kwargs).choices]

        for r in requests:  # the store holds every prompt's chunks from here on: both passes reuse them alike
            ask(r)
        calls_warm = sample(service, "hf_kvcache_http_batch_rows_count")
        alone = [ask(r) for r in requests]
        calls_alone = sample(service, "hf_kvcache_http_batch_rows_count") - calls_warm
        together: list = [None] * len(requests)
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(requests[i])))
                   for i in range(len(requests))]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(_WAIT_S)
        calls_together = sample(service, "hf_kvcache_http_batch_rows_count") - calls_alone - calls_warm
    assert together == alone
    assert calls_alone == len(requests)
    assert calls_together <= 3 + 2  # the greedy ones shared generate calls, by groups; the seeded ones ran alone
    assert alone[5][0] != alone[0][0] and alone[5][0] != alone[5][1]  # sampling did sample, each row its own draws


def test_a_client_that_goes_away_stops_its_generation():
    with serving() as (url, service, _, _):
        body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=_WAIT_S) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and '"text": "' in line:
                    break  # one token arrived; hang up
        deadline = time.monotonic() + _WAIT_S
        while sample(service, "hf_kvcache_http_rows_total", finish_reason="cancelled") < 1:
            assert time.monotonic() < deadline, "the row was never cancelled"
            time.sleep(0.05)
        assert sample(service, "hf_kvcache_http_new_tokens_total") < 400


# ---------------------------------------------------------------------- keys, exposure, the command
def test_api_keys_come_from_config_and_environment_and_guard_exposure():
    settings = ApiServerConfig(api_keys=["from-config"], api_keys_env="MY_KEYS")
    assert api_keys(settings, {"MY_KEYS": " a , ,b"}) == ["from-config", "a", "b"]
    assert api_keys(ApiServerConfig(), {}) == []
    check_exposure("127.0.0.1", [], settings)
    check_exposure("::1", [], settings)
    check_exposure("0.0.0.0", ["a"], settings)
    with pytest.raises(ValueError, match="refusing to serve on '0.0.0.0' without API keys.*MY_KEYS"):
        check_exposure("0.0.0.0", [], settings)
    with pytest.raises(ConfigError, match="`default_max_tokens` \\(20\\) is over `max_tokens` \\(10\\)"):
        ApiServerConfig(max_tokens=10, default_max_tokens=20)
    with pytest.raises(ConfigError, match="empty key"):
        ApiServerConfig(api_keys=[" "])


def test_the_command_refuses_a_public_host_without_keys(capsys, monkeypatch):
    monkeypatch.delenv("HF_KVCACHE_API_KEYS", raising=False)
    assert main(["serve", "--http", "--host", "0.0.0.0", "--port", "0", "--model", str(REAL_MODEL)]) == 2
    assert "refusing to serve on '0.0.0.0' without API keys" in capsys.readouterr().err


def test_the_command_serves_http_until_sigterm(tmp_path):
    # SIGTERM (what a container stop sends) takes the same graceful path as Ctrl-C
    config = tmp_path / "serve.yaml"
    config.write_text("cache: {cpu_kernel: 'off'}\n")  # a fresh process: no time spent loading the C++ kernel
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hf_kvcache_plugin.app.cli", "serve", "--http", "--port", "0", "--model",
         str(REAL_MODEL), "--config", str(config)], stderr=subprocess.PIPE, text=True, env=env, cwd=repo,
    )  # fmt: skip
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "the server exited before serving"
            found = re.search(r"\[http\] OpenAI API on (http://127\.0\.0\.1:\d+)/v1", line)
            url = found.group(1) if found else None
        assert url is not None
        answer = client(url).completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=0)
        assert answer.usage.completion_tokens == 3
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=_WAIT_S)[1]
        assert proc.returncode == 0, rest
        assert "[serve] generate calls: served 1" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(_WAIT_S)


# ---------------------------------------------------------------------- streamed text
class _CharTokenizer:
    """Token i is chr(i); 0xFFFD stands for a character whose bytes are not all there yet."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_streamed_text_holds_back_what_a_stop_string_may_still_cut():
    text = StreamedText(_CharTokenizer(), stop=["END"])
    pieces = [text.add(ord(c)) for c in "ab EN"]
    assert pieces == ["a", "b", " ", "", ""]  # "EN" could begin "END"
    assert text.add(ord("D")) == "" and text.stopped and text.text == "ab "
    assert text.add(ord("x")) == ""  # nothing after a stop
    open_end = StreamedText(_CharTokenizer(), stop=["END"])
    assert [open_end.add(ord(c)) for c in "xE"] == ["x", ""] and open_end.finish() == "E"
    partial = StreamedText(_CharTokenizer())
    assert partial.add(0xFFFD) == "" and partial.finish() == "\ufffd"
