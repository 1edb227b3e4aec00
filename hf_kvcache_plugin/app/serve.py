"""``hf-kvcache serve``: prompts read line by line from stdin, each answered on stdout through ``build_service``."""

from __future__ import annotations

import argparse
import sys
import unicodedata
from collections.abc import Iterable, Iterator
from typing import IO, Any

import torch

from ..config import HealthServerConfig, PluginConfig, load_config
from ..resilience.rate_limit import RateLimitExceeded
from .models import load_model, resolve_model
from .service import ServingService, build_service

__all__ = ["MAX_LINE_BYTES", "LineTooLong", "add_serve_parser", "prompt_of", "read_lines", "serve_lines"]

# a prompt line longer than this is refused unread by the model (stdin is otherwise unbounded)
MAX_LINE_BYTES = 1 << 16


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve", help="answer prompts read from stdin (one per line) with health, metrics and fallbacks"
    )
    serve.add_argument("--model", help="Hugging Face model id or local path (default as for `generate`)")
    serve.add_argument("--config", help="YAML config; its `serving:` section sets breakers, limits, health, http")
    serve.add_argument("--max-new-tokens", type=int, default=32)
    serve.add_argument(
        "--health-host", help=f"bind the /healthz /readyz /metrics endpoint here (default {HealthServerConfig.host})"
    )
    serve.add_argument("--health-port", type=int, help="serve the endpoint on this port (0: any free port)")
    serve.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    serve.add_argument("--http", action="store_true", help="serve the OpenAI-compatible API over HTTP instead of stdin")
    serve.add_argument("--host", help="with --http: bind here (default `serving.api.host`, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="with --http: port (default `serving.api.port`, 8000; 0: any free)")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else PluginConfig()
    if args.max_new_tokens < 1:
        raise ValueError(f"`--max-new-tokens` has to be >= 1 but got {args.max_new_tokens}")
    if args.http:
        # imported here: FastAPI and uvicorn load only for the HTTP mode
        from .http_serve import serve_http

        return serve_http(args, config)
    model, tokenizer = load_model(resolve_model(args.model, config), args.device)
    wants_http = args.health_port is not None or args.health_host is not None or None
    with build_service(model, config, http=wants_http, http_host=args.health_host, http_port=args.health_port) as svc:
        if svc.server is not None:
            print(f"[health] {svc.server.url}/healthz /readyz /metrics", file=sys.stderr, flush=True)
        # bytes, decoded line by line: a line that is not UTF-8 is refused alone instead of ending the loop
        binary = getattr(sys.stdin, "buffer", None)
        lines = sys.stdin if binary is None else read_lines(binary)
        serve_lines(svc, tokenizer, lines, sys.stdout, sys.stderr, args.max_new_tokens, args.device)
        counts = svc.outcomes()
    print("[serve] requests: " + ", ".join(f"{k} {v}" for k, v in counts.items()), file=sys.stderr)
    return 0


def serve_lines(
    svc: ServingService,
    tokenizer: Any,
    lines: Iterable[str | bytes | LineTooLong],
    out: IO[str],
    err: IO[str],
    max_new_tokens: int,
    device: str = "cpu",
) -> None:
    """One request per line; a refused or failed request is reported on ``err`` and the next line is served.

    ``lines`` may be text or raw bytes (decoded here, so a line that is not UTF-8 is refused alone)."""
    for number, line in enumerate(lines, start=1):
        try:
            input_ids = tokenizer(prompt_of(line), return_tensors="pt")["input_ids"].to(device)
            output = svc.endpoint(input_ids, client="stdin", max_new_tokens=max_new_tokens, do_sample=False)
        except (ValueError, RateLimitExceeded) as exc:
            print(f"hf-kvcache: request {number} refused: {exc}", file=err, flush=True)
            continue
        except Exception as exc:  # noqa: BLE001 - one request that failed even on the plain path; serve the next
            print(f"hf-kvcache: request {number} failed: {type(exc).__name__}: {exc}", file=err, flush=True)
            continue
        print(tokenizer.decode(output[0], skip_special_tokens=True), file=out, flush=True)


class LineTooLong(ValueError):
    """An input line over the byte limit; what was read of it is dropped."""


def prompt_of(line: str | bytes | LineTooLong) -> str:
    """The prompt a line holds, or a ``ValueError`` saying why the line is no prompt."""
    if isinstance(line, LineTooLong):
        raise line
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"the line is not UTF-8 text ({exc})") from None
    prompt = line.rstrip("\r\n")
    if not prompt.strip():
        raise ValueError("the prompt is empty: give the text to continue")
    control = next((i for i, c in enumerate(prompt) if unicodedata.category(c) == "Cc" and c != "\t"), None)
    if control is not None:
        raise ValueError(
            f"the prompt holds the control character {prompt[control]!r} at position {control}; send plain text"
        )
    return prompt


def read_lines(stream: IO[bytes], max_bytes: int = MAX_LINE_BYTES) -> Iterator[bytes | LineTooLong]:
    """Lines of a binary stream, each at most ``max_bytes``; a longer one is read to its end, dropped and
    given as a ``LineTooLong`` (memory stays bounded whatever arrives)."""
    while True:
        line = stream.readline(max_bytes + 1)
        if not line:
            return
        if len(line) <= max_bytes or line.endswith(b"\n") and len(line) == max_bytes + 1:
            yield line
            continue
        dropped = len(line)
        while not line.endswith(b"\n"):
            line = stream.readline(max_bytes + 1)
            if not line:
                break
            dropped += len(line)
        yield LineTooLong(f"the line is {dropped} bytes long, over the limit of {max_bytes}; it was dropped")
