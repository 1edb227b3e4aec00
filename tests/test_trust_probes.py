"""Trust boundaries (#14), the probe endpoint: slow or vanishing clients hold bounded threads, no tracebacks."""

from __future__ import annotations

import socket
import struct
import threading
import time
import urllib.request

import pytest

from hf_kvcache_plugin.resilience import CheckResult, HealthChecker, HealthServer


def handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def wait_until(condition, what: str, limit_s: float = 60.0) -> None:
    """Poll ``condition``; the limit only keeps a broken build from hanging the suite."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)


def half_sent(address) -> socket.socket:
    sock = socket.create_connection(address, timeout=30)
    sock.sendall(b"GET /heal")  # and never the rest
    return sock


def healthz(server: HealthServer) -> int:
    with urllib.request.urlopen(server.url + "/healthz", timeout=30) as response:
        return response.status


def test_200_half_sent_connections_hold_at_most_the_cap_of_threads():
    before = handler_threads()
    with HealthServer(HealthChecker(), port=0, request_timeout_s=60, max_connections=4) as server:
        socks = [half_sent(server.address) for _ in range(200)]
        try:
            wait_until(lambda: server.refused_connections + handler_threads() - before >= 200, "the accepts")
            assert handler_threads() - before == 4 and server.refused_connections == 196
        finally:
            for sock in socks:
                sock.close()
        wait_until(lambda: handler_threads() == before, "the handlers to see their clients gone")
        assert healthz(server) == 200


def test_a_client_that_never_finishes_its_request_is_dropped_after_the_timeout():
    with HealthServer(HealthChecker(), port=0, request_timeout_s=0.2, max_connections=1) as server:
        sock = half_sent(server.address)
        assert sock.recv(1024) == b""  # the server closed it (the socket's own 30 s timeout would raise)
        sock.close()
        wait_until(lambda: server.refused_connections == 0 and healthz(server) == 200, "the slot to free")


def test_a_client_gone_before_its_answer_leaves_no_traceback(capfd):
    checker, asked, gone = HealthChecker(), threading.Event(), threading.Event()

    def slow_check() -> CheckResult:
        asked.set()
        gone.wait(30)
        return CheckResult.healthy()

    checker.register("slow", slow_check)
    before = handler_threads()
    with HealthServer(checker, port=0) as server:
        for _ in range(3):
            asked.clear(), gone.clear()
            sock = socket.create_connection(server.address, timeout=30)
            sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: probe\r\n\r\n")
            assert asked.wait(30)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
            sock.close()
            gone.set()
            wait_until(lambda: handler_threads() == before, "the handler to finish")
        assert healthz(server) == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err and "ConnectionReset" not in err


@pytest.mark.parametrize("kwargs", [{"request_timeout_s": 0}, {"request_timeout_s": float("nan")},
                                    {"max_connections": 0}, {"max_connections": True}])  # fmt: skip
def test_limits_are_checked(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        HealthServer(HealthChecker(), port=0, **kwargs)
