"""A small HTTP endpoint for probes and scrapers: ``/healthz``, ``/readyz``, ``/metrics``.

Standard library ``ThreadingHTTPServer`` in a daemon thread; it binds to
127.0.0.1 unless told otherwise. ``/healthz`` (liveness) and ``/readyz``
(readiness) answer JSON with 200 when the status is HEALTHY or DEGRADED and
503 when UNHEALTHY; ``/metrics`` answers the Prometheus text format.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from ..config import HealthServerConfig
from .health import HealthChecker, HealthReport
from .metrics import ServingMetrics

__all__ = ["HealthServer"]

logger = logging.getLogger(__name__)


class HealthServer:
    """Serves a ``HealthChecker`` and ``ServingMetrics`` over HTTP; ``start()``/``stop()`` or ``with``."""

    def __init__(
        self,
        checker: HealthChecker,
        metrics: ServingMetrics | None = None,
        host: str = HealthServerConfig.host,
        port: int = HealthServerConfig.port,
    ):
        HealthServerConfig(host=host, port=port)  # the checks live in the dataclass
        self.checker, self.metrics = checker, metrics
        self.host, self.port = host, port
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
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> "HealthServer":
        if self._server is not None:
            raise ValueError(f"the health server already serves {self.url}")
        handler = type("_BoundHandler", (_Handler,), {"endpoint": self})
        self._server = ThreadingHTTPServer((self.host, self.port), handler)
        self._server.daemon_threads = True
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
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        # probes hit these paths every few seconds: keep them out of stderr
        logger.debug("%s %s", self.address_string(), format % args)
