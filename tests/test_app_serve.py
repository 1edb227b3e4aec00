"""`hf-kvcache serve`: prompts from stdin, refused requests reported, the health endpoint live while serving."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import threading
import urllib.request

from hf_kvcache_plugin.app.cli import main

from .conftest import REAL_MODEL


def test_serve_answers_each_line_and_reports_refused_ones(monkeypatch, capsys, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "cache: {quant_type: int8, residual_length: 16}\n"
        "serving:\n  rate_limit: {enabled: true, burst: 2, rate_per_s: 0.001}\n"
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time\n\nTom went\nLily saw\n"))
    code = main(["serve", "--model", str(REAL_MODEL), "--config", str(config), "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Once upon a time") and lines[1].startswith("Tom went")
    assert "request 2 refused: the prompt is empty" in err
    assert "request 4 refused: client 'stdin' is over its rate limit of 0.001 requests/s (burst 2)" in err
    assert "[serve] requests: served 2, degraded 0, invalid 0, rate_limited 1, failed 0" in err


class _Lines(io.TextIOBase):
    """A stderr that tells the test when the health endpoint's URL has been printed."""

    def __init__(self):
        self.text, self.url, self.ready = "", None, threading.Event()

    def write(self, s: str) -> int:
        self.text += s
        match = re.search(r"\[health\] (http://127\.0\.0\.1:\d+)/healthz", self.text)
        if match and not self.ready.is_set():
            self.url = match.group(1)
            self.ready.set()
        return len(s)


def test_health_endpoint_is_live_while_serving(monkeypatch, capsys):
    read_fd, write_fd = os.pipe()
    stdin, feed = os.fdopen(read_fd, "r"), os.fdopen(write_fd, "w")
    stderr = _Lines()
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stderr", stderr)
    result = {}
    server = threading.Thread(
        target=lambda: result.update(code=main(["serve", "--model", str(REAL_MODEL), "--health-port", "0",
                                                "--max-new-tokens", "3"])),
    )  # fmt: skip
    server.start()
    try:
        assert stderr.ready.wait(120), stderr.text
        feed.write("Once upon a time\n")
        feed.flush()
        with urllib.request.urlopen(stderr.url + "/readyz", timeout=30) as response:
            report = json.loads(response.read())
        assert response.status == 200 and "memory" in report["checks"]
        with urllib.request.urlopen(stderr.url + "/healthz", timeout=30) as response:
            assert response.status == 200
    finally:
        feed.close()
        server.join(120)
    assert result == {"code": 0}
    assert "[serve] requests: served 1" in stderr.text
    assert capsys.readouterr().out.startswith("Once upon a time")


def test_serve_refuses_bad_arguments(capsys):
    assert main(["serve", "--model", str(REAL_MODEL), "--max-new-tokens", "0"]) == 2
    assert "`--max-new-tokens` has to be >= 1 but got 0" in capsys.readouterr().err
