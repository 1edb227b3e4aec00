"""A small HTTP endpoint for probes and scrapers: ``/healthz``, ``/readyz``, ``/metrics``.

Standard library ``ThreadingHTTPServer`` in a daemon thread; it binds to
127.0.0.1 unless told otherwise. A client has ``request_timeout_s`` to send
its request and take the answer, and at most ``max_connections`` are served
at once: a connection over the cap is closed at once, so a flood of
half-sent requests holds a bounded number of threads for a bounded time. A
client that goes away mid-answer is logged at debug level, not as a
traceback. ``/healthz`` (liveness) and ``/readyz``
(readiness) answer JSON with 200 when the status is HEALTHY or DEGRADED and
503 when UNHEALTHY; ``/metrics`` answers the Prometheus text format.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from ..config import HealthServerConfig
from .health import HealthChecker, HealthReport
from .metrics import ServingMetrics

__all__ = ["MAX_CONNECTIONS", "REQUEST_TIMEOUT_S", "HealthServer"]

# probes and scrapers send a few hundred bytes and read a few KiB: seconds are plenty, and a few at once
REQUEST_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16

logger = logging.getLogger(__name__)


class HealthServer:
    """Serves a ``HealthChecker`` and ``ServingMetrics`` over HTTP; ``start()``/``stop()`` or ``with``."""

    def __init__(
        self,
        checker: HealthChecker,
        metrics: ServingMetrics | None = None,
        host: str = HealthServerConfig.host,
        port: int = HealthServerConfig.port,
        *,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ):
        HealthServerConfig(host=host, port=port)  # the checks live in the dataclass
        if not (isinstance(request_timeout_s, (int, float)) and 0 < request_timeout_s <= 3600):
            raise ValueError(f"`request_timeout_s` has to be in (0, 3600] seconds but got {request_timeout_s!r}")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"`max_connections` has to be a positive integer but got {max_connections!r}")
        self.checker, self.metrics = checker, metrics
        self.host, self.port = host, port
        self.request_timeout_s, self.max_connections = float(request_timeout_s), max_connections
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: HealthServerConfig, checker: HealthChecker, metrics: ServingMetrics | None = None):
        return cls(checker, metrics, config.host, config.port)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): with ``port=0`` the port the system picked."""
        if self._server is None:
            raise ValueError("the health server is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def refused_connections(self) -> int:
        """Connections closed unanswered because ``max_connections`` were in service."""
        return 0 if self._server is None else self._server.refused_connections

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> "HealthServer":
        if self._server is not None:
            raise ValueError(f"the health server already serves {self.url}")
        handler = type("_BoundHandler", (_Handler,), {"endpoint": self, "timeout": self.request_timeout_s})
        self._server = _CappedServer((self.host, self.port), handler, self.max_connections)
        self._thread = threading.Thread(target=self._server.serve_forever, name="hf-kvcache-health", daemon=True)
        self._thread.start()
        logger.info("health endpoint serving /healthz /readyz /metrics on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> "HealthServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _CappedServer(ThreadingHTTPServer):
    """At most ``max_connections`` handler threads; a connection over the cap is closed unanswered."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a burst of connects is queued, not dropped and retried

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused_connections = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused_connections += 1
            logger.debug("health endpoint: %s refused: every connection slot is in use", client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()  # no thread was started to release it
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # the base class prints a traceback to stderr; a client that left or stalled is routine for a probe port
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            logger.debug("health endpoint: %s went away (%r)", client_address, exc)
        else:
            logger.warning("health endpoint: request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    endpoint: HealthServer  # set on the per-server subclass

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send_report(self.endpoint.checker.liveness())
        elif path == "/readyz":
            self._send_report(self.endpoint.checker.readiness())
        elif path == "/metrics" and self.endpoint.metrics is not None:
            self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, self.endpoint.metrics.exposition())
        else:
            body = json.dumps({"error": f"no such path {path!r}", "paths": ["/healthz", "/readyz", "/metrics"]})
            self._send(HTTPStatus.NOT_FOUND, "application/json", body.encode())

    def _send_report(self, report: HealthReport) -> None:
        code = HTTPStatus.OK if report.ok else HTTPStatus.SERVICE_UNAVAILABLE
        self._send(code, "application/json", json.dumps(report.to_dict()).encode())

    def _send(self, code: HTTPStatus, content_type: str, body: bytes) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (ConnectionError, TimeoutError) as exc:  # BrokenPipe, reset: the client left before its answer
            logger.debug("health endpoint: %s left before its answer (%r)", self.address_string(), exc)
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        # probes hit these paths every few seconds: keep them out of stderr
        logger.debug("%s %s", self.address_string(), format % args)
