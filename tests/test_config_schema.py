"""configs/schema.json: regenerated it is the committed file, and every shipped YAML satisfies it."""

from __future__ import annotations

import dataclasses
import json
import operator
import re
import runpy
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import yaml

from hf_kvcache_plugin import PluginConfig, parse_config
from hf_kvcache_plugin.config import config_json_schema
from hf_kvcache_plugin.config.schema import _sections

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCHEMA = CONFIGS / "schema.json"
_BOUNDS = {
    "minimum": operator.ge, "maximum": operator.le, "exclusiveMinimum": operator.gt, "exclusiveMaximum": operator.lt
}
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def violations(value, schema: dict, root: dict, path: str = "config") -> list[str]:
    """What in ``value`` breaks ``schema``: the part of JSON Schema the generated schema uses."""
    if "$ref" in schema:
        return violations(value, root["$defs"][schema["$ref"].rsplit("/", 1)[1]], root, path)
    if "anyOf" in schema:
        found = [violations(value, option, root, path) for option in schema["anyOf"]]
        return [] if any(not v for v in found) else [f"{path}: no alternative fits {value!r}"]
    kind = schema.get("type")
    if kind in ("integer", "number"):
        fits = isinstance(value, int if kind == "integer" else (int, float)) and not isinstance(value, bool)
    else:
        fits = kind is None or isinstance(value, _TYPES[kind])
    if not fits:
        return [f"{path}: {value!r} is no {kind}"]
    problems = [f"{path}: {value!r} not in {schema['enum']}"] if value not in schema.get("enum", [value]) else []
    for bound, holds in _BOUNDS.items():
        if bound in schema and not holds(value, schema[bound]):
            problems.append(f"{path}: {value!r} breaks {bound} {schema[bound]}")
    if kind == "object":
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            pattern = schema.get("propertyNames", {}).get("pattern")
            if pattern and not re.match(pattern, str(key)):
                problems.append(f"{path}: key {key!r} does not match {pattern}")
            if key in schema.get("properties", {}):
                problems += violations(item, schema["properties"][key], root, f"{path}.{key}")
            elif extra is False:
                problems.append(f"{path}: unknown key {key!r}")
            elif isinstance(extra, dict):
                problems += violations(item, extra, root, f"{path}.{key}")
    if kind == "array":
        for i, item in enumerate(value):
            problems += violations(item, schema["items"], root, f"{path}.{i}")
    return problems


def _contract(schema: dict) -> dict:
    """What the schema promises, however pydantic lays it out: per section and key, the default, the
    description and every type, choice and bound found under the key."""
    promised = {}
    for section, where in [("PluginConfig", schema), *schema["$defs"].items()]:
        for key, spec in where.get("properties", {}).items():
            found = set()
            pending = [spec]
            while pending:
                node = pending.pop()
                if isinstance(node, dict):
                    found |= {(k, json.dumps(v, sort_keys=True)) for k, v in node.items()
                              if k in ("type", "enum", "const", "$ref", *_BOUNDS)}
                    pending += [v for k, v in node.items() if k not in ("default", "description")]
                elif isinstance(node, list):
                    pending += node
            promised[f"{section}.{key}"] = (json.dumps(spec.get("default")), spec.get("description"), sorted(found))
    return promised


def test_the_committed_schema_is_what_the_command_writes(tmp_path, monkeypatch):
    out = tmp_path / "schema.json"
    monkeypatch.setattr(sys, "argv", ["python -m hf_kvcache_plugin.config", "--schema", str(out)])
    runpy.run_module("hf_kvcache_plugin.config", run_name="__main__")
    written, committed = json.loads(out.read_text()), json.loads(SCHEMA.read_text())
    stale = "configs/schema.json is stale: python -m hf_kvcache_plugin.config --schema configs/schema.json"
    assert _contract(written) == _contract(committed), stale
    if written["$comment"] == committed["$comment"]:  # the same pydantic writes the same bytes
        assert out.read_text() == SCHEMA.read_text(), stale
    assert written == config_json_schema()


def test_the_contract_sees_a_changed_default_bound_or_key():
    schema = config_json_schema()
    for change in (
        lambda s: s["$defs"]["CacheConfig"]["properties"]["residual_length"].update(default=64),
        lambda s: s["$defs"]["BreakerConfig"]["properties"]["fail_max"].update(minimum=0),
        lambda s: s["$defs"]["CacheConfig"]["properties"].pop("sink_tokens"),
    ):
        changed = json.loads(json.dumps(schema))
        change(changed)
        assert _contract(changed) != _contract(schema)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_point_at_and_satisfy_the_schema(path):
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=schema.json\n")
    schema = json.loads(SCHEMA.read_text())
    assert violations(yaml.safe_load(text), schema, schema) == []


@pytest.mark.parametrize(
    "data",
    [
        {"cache": {"quant_type": "int5"}},
        {"cache": {"key_bits": 3}},
        {"cache": {"residual_length": True}},
        {"cache": {"layer_overrides": {"x": {}}}},
        {"serving": {"http": {"port": 70000}}},
        {"distributed": {"breaker_fail_max": 3}},
        {"sizer": {"grow_factor": 1}},
        {"cahce": {}},
    ],
)
def test_the_schema_refuses_what_the_loader_refuses(data):
    schema = json.loads(SCHEMA.read_text())
    assert violations(data, schema, schema)
    with pytest.raises(ValueError):
        parse_config({"prefix_store": {}, **data})


def test_every_section_and_key_is_described_with_its_default():
    schema = config_json_schema()
    for cls in _sections(PluginConfig):
        where = schema if cls is PluginConfig else schema["$defs"][cls.__name__]
        assert where["description"] == cls.__doc__.strip().replace("\n    ", "\n"), cls.__name__
        assert where["additionalProperties"] is False
        assert list(where["properties"]) == [f.name for f in fields(cls)], cls.__name__
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            expected = json.loads(json.dumps(default, default=dataclasses.asdict))
            assert where["properties"][f.name]["default"] == expected, f"{cls.__name__}.{f.name}"
    distributed = schema["$defs"]["DistributedConfig"]["properties"]
    assert distributed["breaker"]["default"] == {"fail_max": 3, "reset_timeout_s": 30.0, "success_threshold": 1}
    assert "has to be" not in json.dumps(schema)  # descriptions, not error messages
