"""The OpenAI API's shapes that ``http_api`` speaks: requests (pydantic), answers, stream chunks, errors.

Only the fields this server acts on are declared; other fields a client
sends (``user``, ``logit_bias``, ...) are ignored, as the OpenAI API ignores
what it does not use. ``temperature: 0`` is greedy decoding.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "ApiError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "chunk",
    "completion",
    "error_body",
    "sse",
    "usage",
]

# For tokenizers without a chat template of their own (stories260K has none): system text first, then one
# "Role: text" line per turn, and "Assistant:" for the model to continue.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] in ['system', 'developer'] %}{{ message['content'] }}\n\n"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
_MAX_STOP = 4  # as the OpenAI API


class ApiError(Exception):
    """An answer in OpenAI's error shape: HTTP ``status``, ``type``, ``code`` and the ``param`` at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:  # noqa: A002
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Sampling(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else list(value)
        if len(stops) > _MAX_STOP:
            raise ValueError(f"at most {_MAX_STOP} stop sequences are supported but got {len(stops)}")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("`echo` is not supported by this server")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("`logprobs` is not supported by this server")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    kind: Literal["text_completion", "chat.completion"],
    request_id: str,
    model: str,
    texts: list[str],
    finish_reasons: list[str],
    use: dict[str, int],
) -> dict[str, Any]:
    """The whole answer of a request that did not stream."""
    if kind == "chat.completion":
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f}
            for i, (t, f) in enumerate(zip(texts, finish_reasons))
        ]
    else:
        choices = [
            {"index": i, "text": t, "logprobs": None, "finish_reason": f}
            for i, (t, f) in enumerate(zip(texts, finish_reasons))
        ]
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices,
            "usage": use}  # fmt: skip


def chunk(
    kind: Literal["text_completion", "chat.completion.chunk"],
    request_id: str,
    model: str,
    index: int | None = None,
    text: str | None = None,
    finish_reason: str | None = None,
    role: bool = False,
    use: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One stream event: a choice's new text or its end, or (``index=None``) the closing usage."""
    choices: list[dict[str, Any]] = []
    if index is not None:
        if kind == "chat.completion.chunk":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choices.append({"index": index, "delta": delta, "finish_reason": finish_reason})
        else:
            choices.append({"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason})
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line pair."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
