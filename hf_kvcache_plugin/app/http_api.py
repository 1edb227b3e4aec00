"""``create_app``: the OpenAI-compatible API (FastAPI) in front of a ``ServingService``.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` answers server-sent events), and on the same port
``/healthz``, ``/readyz`` (the service's ``HealthChecker``) and ``/metrics``
(its ``ServingMetrics``). A ``/v1`` request goes through, in order: its API
key (401; with no keys configured every caller is let in), readiness (503
while the checker says UNHEALTHY), the per-key token bucket of
``serving.rate_limit`` (429 with ``Retry-After``), the model name (404), the
caps of ``serving.api`` (400), the queue of the ``GenerationBatcher`` (503
when full). Generation runs on the batcher's thread through a
``ServingEndpoint`` of its own (entry point ``http``) over the service's
cached and plain paths, so a prefix-store fault costs a recompute, never the
request. A client that goes away (stream closed, or connection dropped while
waiting) cancels its rows. Every response carries ``X-Request-Id`` (the
client's, when it sent a sane one) and every request is logged with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import PluginConfig
from ..resilience.endpoint import ServingEndpoint
from ..resilience.health import HealthReport
from ..resilience.rate_limit import RateLimitExceeded
from .event_bridge import STREAM_FLUSH_S, EventBridge
from .batcher import GenerationBatcher, GenerationJob, QueueFull, RowEnd, restarting
from .openai_protocol import (
    FALLBACK_CHAT_TEMPLATE,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chunk,
    completion,
    error_body,
    sse,
    usage,
)
from .service import ServingService

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_PROBES = ("/healthz", "/readyz", "/metrics")
_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", *_PROBES)
_DISCONNECT_POLL_S = 0.5


def create_app(
    service: ServingService,
    model: Any,
    tokenizer: Any,
    model_name: str,
    config: PluginConfig | None = None,
    api_keys: Sequence[str] = (),
    generate: Callable[..., Any] | None = None,
) -> FastAPI:
    """The app for ``model`` behind ``service`` (built from the same ``config``); its batcher starts and stops
    with the app (lifespan).

    ``model_name`` is the id ``/v1/models`` lists and requests have to name; ``config.serving.api`` sets the
    caps and the batching; ``api_keys`` (none: no key needed) are compared in constant time and never logged.
    ``generate`` replaces the service's cached path (``http_cluster.RoutedGeneration`` under a launch).
    """
    config = config if config is not None else PluginConfig()
    settings = config.serving.api
    generation = model.generation_config
    eos = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = generation.pad_token_id if generation.pad_token_id is not None else (eos_ids or [0])[0]
    max_positions = getattr(model.config, "max_position_embeddings", None)
    endpoint = ServingEndpoint(
        restarting(generate if generate is not None else service.endpoint.generate),
        None if service.endpoint.fallback_generate is None else restarting(service.endpoint.fallback_generate),
        name="http",
        metrics=service.metrics,
    )  # fmt: skip
    batcher = GenerationBatcher(
        endpoint, tokenizer, pad_token_id=pad, eos_token_ids=eos_ids, max_batch_size=settings.max_batch_size,
        batch_wait_s=settings.batch_wait_ms / 1e3, max_queue=settings.max_queue, device=model.device,
        align=_cache_group_size(config, model.config),
    )  # fmt: skip
    limiter = service.endpoint.limiter
    keys = [(k.encode(), "key-" + hashlib.sha256(k.encode()).hexdigest()[:12]) for k in api_keys]
    requests_total = service.metrics.counter(
        "hf_kvcache_http_requests", "HTTP requests by route and status", ["route", "status"]
    )
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="hf-kvcache", lifespan=lifespan)
    app.add_middleware(_RequestIds, requests_total=requests_total)
    app.state.batcher = batcher
    _add_error_handlers(app)

    # ------------------------------------------------------------------ admission
    def caller(request: Request) -> str:
        """The rate-limit key of the caller: a digest of its API key, or its address when keys are off."""
        if not keys:
            return f"addr-{request.client.host if request.client else 'unknown'}"
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "no API key given: send `Authorization: Bearer KEY`", code="invalid_api_key")
        given = token.strip().encode()
        for key, label in keys:
            if hmac.compare_digest(key, given):
                return label
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")

    async def admit(request: Request, client: str = Depends(caller)) -> str:
        # off the event loop: the checks read psutil and take the store's lock
        report = await run_in_threadpool(service.checker.readiness)
        if not report.ok:
            reasons = "; ".join(f"{name}: {c.reason}" for name, c in report.checks.items() if c.reason)
            raise ApiError(503, f"the server is not ready ({reasons})", "server_error", "not_ready")
        if limiter is not None:
            try:
                await run_in_threadpool(limiter.acquire, client)
            except RateLimitExceeded as exc:
                service.metrics.requests.labels("http", "rate_limited").inc()
                retry = max(1, int(exc.retry_after_s + 0.999))
                raise ApiError(429, str(exc), "requests", "rate_limit_exceeded", headers={"Retry-After": str(retry)})
        return client

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           code="model_not_found", param="model")  # fmt: skip

    def new_tokens(asked: int | None, prompt_tokens: int) -> int:
        if asked is not None and asked > settings.max_tokens:
            raise ApiError(400, f"`max_tokens` is {asked} but this server allows at most {settings.max_tokens}",
                           param="max_tokens")  # fmt: skip
        wanted = asked if asked is not None else settings.default_max_tokens
        if max_positions is not None and prompt_tokens + wanted > max_positions:
            if asked is None and prompt_tokens < max_positions:
                return max_positions - prompt_tokens
            raise ApiError(
                400, f"the prompt has {prompt_tokens} tokens and {wanted} new ones are asked for: the model "
                f"takes at most {max_positions} in all", code="context_length_exceeded", param="max_tokens",
            )  # fmt: skip
        return wanted

    def check_prompt(ids: list[int], param: str) -> list[int]:
        if len(ids) == 0 or not tokenizer.decode(ids, skip_special_tokens=True).strip():
            raise ApiError(400, "the prompt is empty: give the text to continue", param=param)
        if len(ids) > settings.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but this server takes at most "
                           f"{settings.max_prompt_tokens}", code="context_length_exceeded", param=param)  # fmt: skip
        return ids

    def check_rows(prompts: int, n: int) -> None:
        if prompts * n > settings.max_batch_size:
            raise ApiError(400, f"{prompts} prompt(s) x n={n} is {prompts * n} completions; this server makes at "
                           f"most {settings.max_batch_size} per request", param="n")  # fmt: skip

    # ------------------------------------------------------------------ routes
    @app.get("/v1/models")
    async def list_models(client: str = Depends(caller)) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "hf-kvcache"}]}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, client: str = Depends(admit)) -> Any:
        check_model(body.model)
        check_rows(len(body.prompts), body.n)
        prompts = [check_prompt(tokenizer(p)["input_ids"], "prompt") for p in body.prompts]
        max_new = max(new_tokens(body.max_tokens, len(ids)) for ids in prompts)
        return await answer(request, "text_completion", "cmpl", body, prompts, max_new, client)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, client: str = Depends(admit)) -> Any:
        check_model(body.model)
        check_rows(1, body.n)
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
        ids = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                            tokenize=True)["input_ids"]  # fmt: skip
        ids = check_prompt(list(ids), "messages")
        return await answer(request, "chat.completion", "chatcmpl", body, [ids], new_tokens(body.new_tokens, len(ids)),
                            client)  # fmt: skip

    @app.get("/healthz")
    def healthz() -> Response:
        return _report(service.checker.liveness())

    @app.get("/readyz")
    def readyz() -> Response:
        return _report(service.checker.readiness())

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ answering
    async def answer(
        request: Request, kind: str, prefix: str, body: Any, prompts: list[list[int]], max_new: int, client: str
    ) -> Any:
        request_id = f"{prefix}-{request.state.request_id}"
        rows = [ids for ids in prompts for _ in range(body.n)]
        bridge = EventBridge(asyncio.get_running_loop(), STREAM_FLUSH_S if body.stream else math.inf)
        events, put = bridge.queue, bridge.put

        job = GenerationJob(
            request_id, rows, max_new,
            on_text=lambda row, text: put("text", row, text),
            on_end=lambda row, end: put("end", row, end),
            on_error=lambda exc: put("error", -1, exc),
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop or [], client=client,
        )  # fmt: skip
        try:
            batcher.submit(job)
        except QueueFull as exc:
            raise ApiError(503, str(exc), "server_error", "overloaded") from None
        prompt_tokens = sum(len(ids) for ids in prompts)
        if body.stream:
            chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
            return StreamingResponse(
                _stream(events, job, chunk_kind, model_name, len(rows), prompt_tokens),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
            )  # fmt: skip
        texts, ends = [""] * len(rows), [None] * len(rows)
        try:
            while any(end is None for end in ends):
                try:
                    event, row, payload = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_S)
                except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                    if await request.is_disconnected():
                        logger.info("%s: the client went away; generation stopped", request_id)
                        return Response(status_code=499)
                    continue
                if event == "error":
                    raise ApiError(500, f"generation failed: {payload!r}", "server_error", "generation_failed")
                if event == "text":
                    texts[row] += payload
                else:
                    ends[row] = payload
        finally:
            job.cancelled.set()  # a no-op once every row ended
        use = usage(prompt_tokens, sum(end.completion_tokens for end in ends))
        return completion(kind, request_id, model_name, texts, [end.finish_reason for end in ends], use)

    return app


async def _stream(
    events: asyncio.Queue, job: GenerationJob, kind: str, model_name: str, rows: int, prompt_tokens: int
) -> AsyncIterator[str]:
    """SSE of one request: its choices' text as it settles, each choice's end, then usage and ``[DONE]``."""
    rid = job.request_id
    try:
        if kind == "chat.completion.chunk":
            for row in range(rows):
                yield sse(chunk(kind, rid, model_name, row, text="", role=True))
        ended, completion_tokens = 0, 0
        while ended < rows:
            event, row, payload = await events.get()
            if event == "error":
                yield sse(error_body(f"generation failed: {payload!r}", "server_error", "generation_failed"))
                return
            if event == "text":
                yield sse(chunk(kind, rid, model_name, row, text=payload))
                continue
            end: RowEnd = payload
            ended, completion_tokens = ended + 1, completion_tokens + end.completion_tokens
            yield sse(chunk(kind, rid, model_name, row, finish_reason=end.finish_reason))
        yield sse(chunk(kind, rid, model_name, use=usage(prompt_tokens, completion_tokens)))
        yield sse("[DONE]")
    finally:
        # closed early (the client went away): its rows stop at the next token; a no-op after [DONE]
        job.cancelled.set()


def _cache_group_size(config: PluginConfig, model_config: Any) -> int:
    """Tokens per quantized cache block for this model: left padding in multiples of it stays in blocks of its own."""
    heads = getattr(model_config, "num_attention_heads", None)
    head_dim = getattr(model_config, "head_dim", None) or (model_config.hidden_size // heads if heads else None)
    return config.cache.for_model(model_config.num_hidden_layers, head_dim).group_size


def _report(report: HealthReport) -> Response:
    return JSONResponse(report.to_dict(), status_code=200 if report.ok else 503)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = f"`{'.'.join(where)}`: {first['msg']}" if where else str(first["msg"])
        return JSONResponse(error_body(message, "invalid_request_error", param=".".join(where) or None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(error_body(message, kind), exc.status_code, headers=getattr(exc, "headers", None))


class _RequestIds:
    """ASGI middleware: a request id per HTTP request, in ``request.state``, the response header and the log."""

    def __init__(self, app: Any, requests_total: Any):
        self.app, self.requests_total = app, requests_total

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        start, path = time.perf_counter(), scope.get("path", "")
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            ms = (time.perf_counter() - start) * 1e3
            route = path if path in _ROUTES else "other"
            self.requests_total.labels(route, str(status["code"])).inc()
            # probes come every few seconds: keep them out of the info log
            level = logging.DEBUG if path in _PROBES else logging.INFO
            logger.log(level, "%s %s %s -> %d (%.1f ms)", request_id, scope.get("method"), path, status["code"], ms)
