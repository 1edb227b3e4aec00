"""The control messages' shapes, checked on arrival: a peer's message is used only once it parses here.

Every JSON message a peer posts (its round view, its results for this
process, its directory, its eviction orders, its node record) is parsed by a
strict ``pydantic`` model: exact types (no "1" for 1), no unknown fields,
chunk keys as 64 hex digits, counts >= 0. A message that does not parse, or
that is inconsistent in a way a model cannot say (a node record naming
another rank, token ids outside the vocabulary, results for prompts that
were not routed to that peer), raises ``PayloadError`` (the caller drops it
and counts it against the peer). Nothing else comes out of these functions.
"""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from .nodes import NodeInfo
from .payloads import PayloadError, decode_json

__all__ = ["DirectoryMessage", "ViewMessage", "parse_directory", "parse_evictions", "parse_node", "parse_results",
           "parse_view"]

Count = Annotated[int, Field(ge=0)]
Token = Annotated[int, Field(ge=0)]
HexKey = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ViewMessage(_Message):
    """A process's round view (``round_runner``): its record, its prompts, its announcements, and how many new
    tokens its prompts want (None: the server's own ``generate_kwargs``)."""

    node: dict[str, Any]
    prompts: list[list[Token]]
    directory_version: Count
    migrations: dict[str, Count]
    evictions: Count
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None


class DirectoryMessage(_Message):
    version: Count
    sizes: dict[HexKey, Count]


def _parse(model: type[_Message], data: bytes, what: str) -> Any:
    try:
        return model.model_validate(decode_json(data))
    except pydantic.ValidationError as exc:
        raise PayloadError(f"not a {what}: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from None


def _check_tokens(prompts: list[list[int]], vocab_size: int | None, what: str) -> None:
    if vocab_size is None:
        return
    for i, prompt in enumerate(prompts):
        bad = next((t for t in prompt if t >= vocab_size), None)
        if bad is not None:
            raise PayloadError(f"{what} {i} holds token id {bad}, outside the vocabulary of {vocab_size}")


def parse_node(data: bytes, peer: int) -> NodeInfo:
    record = decode_json(data)
    if not isinstance(record, dict):
        raise PayloadError(f"a node record is a mapping but got {type(record).__name__}")
    return node_of(record, peer)


def node_of(record: dict[str, Any], peer: int) -> NodeInfo:
    try:
        node = NodeInfo(**record)
    except (TypeError, ValueError) as exc:
        raise PayloadError(f"not a node record: {exc}") from None
    if node.node_id != peer:
        raise PayloadError(f"rank {peer} sent the record of node {node.node_id!r}")
    return node


def parse_view(data: bytes, peer: int, vocab_size: int | None) -> tuple[ViewMessage, NodeInfo]:
    view = _parse(ViewMessage, data, "round view")
    _check_tokens(view.prompts, vocab_size, "prompt")
    if any(not prompt for prompt in view.prompts):
        raise PayloadError("a round view holds an empty prompt")
    bad_targets = [t for t in view.migrations if not t.isdigit()]
    if bad_targets:
        raise PayloadError(f"migration targets are ranks but got {bad_targets[:3]}")
    return view, node_of(view.node, peer)


def parse_results(data: bytes, expected: set[int], vocab_size: int | None) -> dict[int, list[int]]:
    """A server's outputs for this process: prompt index -> new tokens, only for the indices routed to it."""
    try:
        results = pydantic.TypeAdapter(dict[str, list[Token]]).validate_python(decode_json(data), strict=True)
    except pydantic.ValidationError as exc:
        raise PayloadError(f"not a result message: {exc.errors()[0]['msg']}") from None
    indices = {}
    for i, tokens in results.items():
        if not i.isdigit() or int(i) not in expected:
            raise PayloadError(f"results for prompt {i!r}, which was not routed there (expected {sorted(expected)})")
        indices[int(i)] = tokens
    _check_tokens(list(indices.values()), vocab_size, "output")
    return indices


def parse_directory(data: bytes) -> tuple[int, dict[bytes, int]]:
    message = _parse(DirectoryMessage, data, "directory")
    return message.version, {bytes.fromhex(k): n for k, n in message.sizes.items()}


def parse_evictions(data: bytes) -> dict[str, int]:
    try:
        return pydantic.TypeAdapter(dict[str, Count]).validate_python(decode_json(data), strict=True)
    except pydantic.ValidationError as exc:
        raise PayloadError(f"not an eviction order: {exc.errors()[0]['msg']}") from None
