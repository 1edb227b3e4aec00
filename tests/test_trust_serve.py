"""Trust boundaries (#14), `hf-kvcache serve` and the endpoint: any line, any token id, a stuck loop seen."""

from __future__ import annotations

import io
import sys
import threading

import pytest
import torch

from hf_kvcache_plugin.app.cli import main
from hf_kvcache_plugin.app.serve import MAX_LINE_BYTES, LineTooLong, prompt_of, read_lines
from hf_kvcache_plugin.app.service import build_service
from hf_kvcache_plugin.config import parse_config
from hf_kvcache_plugin.resilience.liveness import ProgressWatch

from .conftest import REAL_MODEL


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_serve_survives_any_line_with_a_per_line_error(monkeypatch, capsys):
    stdin = (
        b"Once upon a time\n"
        b"caf\xe9 \xff\xfe\n"  # latin-1, not UTF-8
        b"\n"
        b"   \t \r\n"
        + b"a" * (MAX_LINE_BYTES + 10) + b"\n"
        + b"Tom \x00 went\x1b[2J\n"
        b"Lily saw\n"
    )  # fmt: skip
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main(["serve", "--model", str(REAL_MODEL), "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Once upon a time") and lines[1].startswith("Lily saw")
    assert "request 2 refused: the line is not UTF-8 text" in err
    assert "request 3 refused: the prompt is empty" in err and "request 4 refused: the prompt is empty" in err
    assert f"request 5 refused: the line is {MAX_LINE_BYTES + 11} bytes long, over the limit of {MAX_LINE_BYTES}" in err
    assert "request 6 refused: the prompt holds the control character '\\x00' at position 4" in err
    assert "Traceback" not in err
    assert "[serve] requests: served 2, degraded 0, invalid 0, rate_limited 0, failed 0" in err


def test_read_lines_bounds_memory_and_keeps_line_numbers():
    data = b"ab\n" + b"x" * 10 + b"\nyyyy\n" + b"q" * 5
    got = list(read_lines(io.BytesIO(data), max_bytes=5))
    assert got[0] == b"ab\n" and got[2] == b"yyyy\n"
    assert isinstance(got[1], LineTooLong) and "11 bytes" in str(got[1])
    assert got[3] == b"q" * 5 and len(got) == 4  # exactly at the limit, no newline at the end of the stream
    with pytest.raises(ValueError, match="not UTF-8"):
        prompt_of(b"\xc3\x28")
    assert prompt_of("tab\tkept\r\n") == "tab\tkept"


@pytest.mark.parametrize("bad", [-1, 10**6])
def test_token_ids_out_of_the_vocabulary_are_refused_before_the_model_runs(model, bad):
    svc = build_service(model, parse_config({"cache": {"quant_type": "int8"}}))
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        ids = torch.tensor([[1, 2, bad, 3]])
        vocab = model.get_input_embeddings().num_embeddings
        with pytest.raises(ValueError, match=rf"token ids have to be in \[0, {vocab}\).*holds {bad} at row 0, position 2"):
            svc.endpoint(ids, max_new_tokens=2)
    finally:
        handle.remove()
    assert calls == []  # neither the cached nor the plain path ran
    assert svc.outcomes() == {"served": 0, "degraded": 0, "invalid": 1, "rate_limited": 0, "failed": 0}
    svc.close()


def test_healthz_reflects_a_stuck_serving_loop(model):
    clock = Clock()
    svc = build_service(model, parse_config({"serving": {"health": {"stall_after_s": 60}}}), progress_clock=clock)
    entered, release = threading.Event(), threading.Event()

    def hanging_generate(input_ids, **kwargs):
        entered.set()
        release.wait()
        return input_ids

    svc.endpoint.generate = hanging_generate
    worker = threading.Thread(target=lambda: svc.endpoint(torch.tensor([[1, 2]]), max_new_tokens=1))
    assert svc.checker.liveness().ok and "serving_progress" in svc.checker.liveness().checks
    worker.start()
    try:
        assert entered.wait(60)
        clock.now = 59.0
        assert svc.checker.liveness().ok
        clock.now = 61.0
        report = svc.checker.liveness()
        assert not report.ok and "serving loop looks stuck" in report.checks["serving_progress"].reason
    finally:
        release.set()
        worker.join(60)
    assert svc.checker.liveness().ok  # finished: alive again
    svc.close()


def test_progress_watch_counts_overlapping_requests():
    clock = Clock()
    watch = ProgressWatch(10, clock)
    with watch.request():
        clock.now = 5
        with watch.request():
            assert watch.in_flight == 2
            clock.now = 11
            assert watch.check().status.value == "unhealthy"  # the first one has run 11 s
        assert watch.check().status.value == "unhealthy"
    assert watch.in_flight == 0 and watch.check().status.value == "healthy"
    with pytest.raises(ValueError, match="stall_after_s"):
        ProgressWatch(float("nan"))
