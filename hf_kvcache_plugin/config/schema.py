"""The JSON schema of the YAML file, for editors (``# yaml-language-server: $schema=schema.json``)."""

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import pydantic
from pydantic_core import to_jsonable_python

from .sections import PluginConfig

__all__ = ["config_json_schema", "write_json_schema"]


def config_json_schema() -> dict[str, Any]:
    """Every section and key with its type, bounds, choices, default and description."""
    schema = pydantic.TypeAdapter(PluginConfig).json_schema()
    # pydantic leaves out the defaults a factory makes; an editor should show them too
    for cls in _sections(PluginConfig):
        where = schema if cls is PluginConfig else schema["$defs"][cls.__name__]
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:
                where["properties"][f.name]["default"] = to_jsonable_python(f.default_factory())
    # the generator's version: another pydantic may lay out the same schema differently
    comment = f"written by `python -m hf_kvcache_plugin.config --schema PATH` with pydantic {pydantic.VERSION}"
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$comment": comment, **schema}


def write_json_schema(path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_json_schema(), indent=2) + "\n")


def _sections(root: type) -> list[type]:
    """``root`` and every dataclass in its annotations, recursively, each once."""
    found: list[type] = []
    pending: list[Any] = [root]
    while pending:
        annotation = pending.pop()
        if dataclasses.is_dataclass(annotation):
            if annotation not in found:
                found.append(annotation)
                pending.extend(typing.get_type_hints(annotation).values())
        else:
            pending.extend(typing.get_args(annotation))
    return found
