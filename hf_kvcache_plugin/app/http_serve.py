"""``hf-kvcache serve --http``: the OpenAI-compatible API on uvicorn, and ``ApiServer`` to run it in a thread.

With a ``distributed:`` section under ``torchrun`` only rank 0 binds the port;
the other ranks serve the prompts routed to them (``http_cluster``).

API keys are ``serving.api.api_keys`` plus the comma-separated environment
variable named by ``serving.api.api_keys_env``. Without any, the server
refuses to bind anything but a loopback address: an open model on a network
is a decision to write down as a key, not a default.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import uvicorn

from ..config import ApiServerConfig, PluginConfig
from .http_api import create_app
from .http_cluster import FRONT_RANK, RoutedGeneration, serve_worker
from .models import load_model, resolve_model
from .service import OUTCOMES, build_service

__all__ = ["ApiServer", "api_keys", "check_exposure", "serve_http"]

logger = logging.getLogger(__name__)


def api_keys(settings: ApiServerConfig, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The keys of the config, then those of the environment variable it names (blanks dropped)."""
    from_env = [k.strip() for k in environ.get(settings.api_keys_env, "").split(",") if k.strip()]
    return [*settings.api_keys, *from_env]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: it may resolve anywhere
        return False


def check_exposure(host: str, keys: list[str], settings: ApiServerConfig) -> None:
    """``ValueError`` for a non-loopback ``host`` without API keys."""
    if not keys and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host!r} without API keys: anyone who reaches it could use the model. Set "
            f"`serving.api.api_keys` or the environment variable {settings.api_keys_env} (comma-separated keys), "
            "or bind a loopback address (--host 127.0.0.1)"
        )


# Idle keep-alive connections are closed by the server after this long. Longer than the 5 s after which
# httpx (and so the openai client) drops an idle pooled connection: the client closes first. With both at
# 5 s a client can send a request onto a connection the server is closing at that moment and get "Server
# disconnected without sending a response" (encode/httpx#2487, a lost answer in a load test).
KEEP_ALIVE_S = 65


class ApiServer:
    """uvicorn serving ``app`` on (host, port) in a daemon thread; ``port=0`` picks a free port."""

    def __init__(self, app: object, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"):
        self.app, self.host, self.port = app, host, port
        self.config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5,
                                     timeout_keep_alive=KEEP_ALIVE_S)  # fmt: skip
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        if self._socket is None:
            raise ValueError("the API server is not started")
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self._socket = sock
        return sock

    def start(self, timeout_s: float = 60.0) -> "ApiServer":
        if self._server is not None:
            raise ValueError(f"the API server already serves {self.url}")
        sock = self.bind()
        self._server = uvicorn.Server(self.config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="hf-kvcache-http")  # fmt: skip
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            self.stop()
            raise RuntimeError(f"the API server did not start on {self.host}:{self.port} within {timeout_s} s")
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._socket.close()
        self._server = self._thread = None

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_http(args: argparse.Namespace, config: PluginConfig) -> int:
    """Serve until interrupted (Ctrl-C / SIGTERM); the health endpoint's routes are on the same port."""
    settings = config.serving.api
    host = args.host if args.host is not None else settings.host
    port = args.port if args.port is not None else settings.port
    keys = api_keys(settings)
    check_exposure(host, keys, settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    name = resolve_model(args.model, config)
    model, tokenizer = load_model(name, args.device)
    served_name = Path(name).name if Path(name).is_dir() else name
    # greedy unless a request samples: rounds (under a launch) serve what rank 0 routes with these
    with build_service(model, config, http=False, generate_kwargs={"do_sample": False}) as service:
        routed = None
        coordinator = service.coordinator
        if coordinator is not None and coordinator.transport is not None:  # `distributed:` under torchrun
            if coordinator.node_id != FRONT_RANK:
                print(f"[http] rank {coordinator.node_id}: serving rounds for rank {FRONT_RANK}", file=sys.stderr,
                      flush=True)  # fmt: skip
                previous = signal.signal(signal.SIGTERM, _interrupt)
                try:
                    rounds = serve_worker(coordinator)
                except KeyboardInterrupt:  # the launcher stops every rank: leave (peers stop waiting at once)
                    rounds = coordinator.stats()["round"]
                finally:
                    signal.signal(signal.SIGTERM, previous)
                served = coordinator.stats().get("served_for_others", 0)
                print(f"[serve] rank {coordinator.node_id}: {rounds} rounds, {served} prompts served for rank "
                      f"{FRONT_RANK}", file=sys.stderr)  # fmt: skip
                return 0
            routed = RoutedGeneration(coordinator, service.endpoint.generate).start()
        app = create_app(service, model, tokenizer, served_name, config, keys, generate=routed)
        server = ApiServer(app, host, port, log_level="info")
        sock = server.bind()
        print(f"[http] OpenAI API on {server.url}/v1 (model {served_name!r}; /healthz /readyz /metrics; "
              f"{'API keys required' if keys else 'no API key needed'})", file=sys.stderr, flush=True)  # fmt: skip
        # In the main thread uvicorn handles SIGINT / SIGTERM itself (a graceful shutdown) and then re-raises
        # the signal; with SIGTERM turned into KeyboardInterrupt too, both end here and the summary is printed.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            uvicorn.Server(server.config).run(sockets=[sock])
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            sock.close()
            if routed is not None:
                routed.stop()
        value = service.metrics.value
        counts = {o: int(value("hf_kvcache_requests_total", entry_point="http", outcome=o) or 0) for o in OUTCOMES}
    print("[serve] generate calls: " + ", ".join(f"{k} {v}" for k, v in counts.items()), file=sys.stderr)
    return 0
