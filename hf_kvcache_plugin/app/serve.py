"""``hf-kvcache serve``: prompts read line by line from stdin, each answered on stdout through ``build_service``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import IO, Any

import torch

from ..config import HealthServerConfig, PluginConfig, load_config
from ..resilience.rate_limit import RateLimitExceeded
from .models import load_model, resolve_model
from .service import ServingService, build_service

__all__ = ["add_serve_parser", "serve_lines"]


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
        serve_lines(svc, tokenizer, sys.stdin, sys.stdout, sys.stderr, args.max_new_tokens, args.device)
        counts = svc.outcomes()
    print("[serve] requests: " + ", ".join(f"{k} {v}" for k, v in counts.items()), file=sys.stderr)
    return 0


def serve_lines(
    svc: ServingService,
    tokenizer: Any,
    lines: Iterable[str],
    out: IO[str],
    err: IO[str],
    max_new_tokens: int,
    device: str = "cpu",
) -> None:
    """One request per line; a refused request is reported on ``err`` and the next line is served."""
    for number, line in enumerate(lines, start=1):
        prompt = line.rstrip("\n")
        try:
            if not prompt.strip():
                raise ValueError("the prompt is empty: give the text to continue")
            input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            output = svc.endpoint(input_ids, client="stdin", max_new_tokens=max_new_tokens, do_sample=False)
        except (ValueError, RateLimitExceeded) as exc:
            print(f"hf-kvcache: request {number} refused: {exc}", file=err, flush=True)
            continue
        print(tokenizer.decode(output[0], skip_special_tokens=True), file=out, flush=True)
