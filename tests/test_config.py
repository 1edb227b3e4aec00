"""YAML loading: every shipped config loads and builds a cache; bad input names the key."""

from __future__ import annotations

import inspect
import math
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from hf_kvcache_plugin import (
    CacheConfig,
    ConfigError,
    DistributedConfig,
    PluginConfig,
    QuantizedKVCache,
    load_config,
    parse_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_build_a_cache(path, model):
    cfg = load_config(path)
    cache = QuantizedKVCache.from_config(cfg, model.config)
    assert cache.cache_config.group_size is not None
    assert len(cache.layers) == model.config.num_hidden_layers


def test_expected_shipped_configs_exist():
    assert {"int8.yaml", "int4.yaml", "int2.yaml", "mixed.yaml"} <= {p.name for p in CONFIGS}


def test_defaults_live_in_the_dataclass():
    cfg = parse_config({})
    assert cfg.cache == CacheConfig()
    assert cfg.model is None


def test_layer_overrides_parse_to_dataclasses():
    cfg = parse_config({"cache": {"quant_type": "int2", "layer_overrides": {"1": {"key_bits": 8}}}})
    assert cfg.cache.layer_overrides[1].key_bits == 8
    assert cfg.cache.layer_overrides[1].value_bits is None


@pytest.mark.parametrize(
    "data,message",
    [
        ({"cache": {"quant_typ": "int4"}}, r"unknown key\(s\) \['quant_typ'\] in `cache`; allowed keys are"),
        ({"cahce": {}}, r"unknown key\(s\) \['cahce'\] in `config`"),
        ({"cache": {"group_size": "32"}}, r"`cache.group_size` has to be of type int \| None but got str: '32'"),
        ({"cache": {"residual_length": True}}, r"`cache.residual_length` has to be of type int but got bool"),
        ({"cache": {"quant_type": "int3"}}, r"`cache.quant_type` has to be one of \['int8', 'int4', 'int2', 'mixed'\] but got 'int3'"),
        ({"cache": {"key_bits": 3}}, r"`cache.key_bits` has to be one of \[2, 4, 8\] or null but got 3"),
        ({"cache": {"group_size": 32, "residual_length": 48}}, r"`cache.residual_length` has to be a multiple of `group_size` \(32\) but got 48"),
        ({"cache": {"group_size": 0}}, r"`cache.group_size` has to be a positive integer or null but got 0"),
        ({"cache": {"group_size": 2, "residual_length": 0, "quant_type": "int2"}}, r"multiple of 4 to pack 2-bit"),
        ({"cache": {"sink_tokens": -1}}, r"`cache.sink_tokens` has to be >= 0 but got -1"),
        ({"cache": {"scale_dtype": "fp8"}}, r"`cache.scale_dtype` has to be one of"),
        ({"cache": {"key_axis": "row"}}, r"`cache.key_axis` has to be one of \['channel', 'token'\]"),
        ({"cache": {"clip_percentile": 20}}, r"`cache.clip_percentile` has to be in \(50, 100\] or null but got 20"),
        ({"cache": {"layer_overrides": {"x": {}}}}, r"`cache.layer_overrides` keys have to be layer indices"),
        ({"cache": {"layer_overrides": {0: {"bits": 4}}}}, r"unknown key\(s\) \['bits'\] in `cache.layer_overrides.0`"),
        ({"cache": {"skip_layers": [1, "a"]}}, r"`cache.skip_layers.1` has to be of type int but got str: 'a'"),
        ({"cache": {"max_size_mb": 0}}, r"`cache.max_size_mb` has to be in \(0, 1073741824.0\] or null but got 0"),
        ({"cache": {"max_size_mb": True}}, r"`cache.max_size_mb` has to be of type float \| None but got bool: True"),
        ({"cache": [1, 2]}, r"`cache` has to be of type mapping but got list"),
        ({"model": 5}, r"`model` has to be of type str \| None but got int"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        parse_config(data)


def test_model_dependent_checks(model):
    head_dim = model.config.head_dim
    cfg = parse_config({"cache": {"group_size": head_dim * 2, "residual_length": 0}})
    with pytest.raises(ValueError, match=rf"`group_size` \({head_dim * 2}\) has to divide head_dim \({head_dim}\)"):
        QuantizedKVCache.from_config(cfg, model.config)
    cfg = parse_config({"cache": {"skip_layers": [99]}})
    with pytest.raises(ValueError, match=r"`skip_layers` names layers \[99\]"):
        QuantizedKVCache.from_config(cfg, model.config)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml.*is not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("cache:\n  residual: 3\n")
    with pytest.raises(ValueError, match=r"unknown.yaml: unknown key\(s\) \['residual'\]"):
        load_config(unknown)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).cache == CacheConfig()


# ---------------------------------------------------------------------- every problem at once
def test_problems_in_several_sections_are_reported_together():
    data = {
        "cache": {"quant_type": "int5", "layer_overrides": {3: {"key_bits": 3}}, "skip_layers": [-1]},
        "serving": {"breaker": {"fail_max": 0}, "rate_limit": {"burst": "20"}, "health": {"memory_high": 0.99}},
        "prefix_store": {"eviction": "fifo"},
        "sizer": {"grow_factor": 0.5},
        "distributed": {"replication_factor": True, "breaker_fail_max": 3},
        "modle": "x",
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.errors == [
        "`cache.quant_type` has to be one of ['int8', 'int4', 'int2', 'mixed'] but got 'int5'",
        "`cache.layer_overrides.3.key_bits` has to be one of [2, 4, 8] or null but got 3",
        "`cache.skip_layers.0` has to be >= 0 but got -1",
        "`serving.breaker.fail_max` has to be a positive integer but got 0",
        "`serving.rate_limit.burst` has to be of type int but got str: '20'",
        "memory thresholds have to satisfy 0 < memory_moderate < memory_high < memory_critical <= 1 but got "
        "0.7, 0.99, 0.95 (in `serving.health`)",
        "`prefix_store.eviction` has to be one of ['lru', 'lfu'] but got 'fifo'",
        "`sizer.grow_factor` has to be > 1 but got 0.5",
        "`distributed.replication_factor` has to be of type int but got bool: True",
        "`distributed.breaker_fail_max` moved to `distributed.breaker.fail_max`",
        "unknown key(s) ['modle'] in `config`; allowed keys are "
        "['cache', 'distributed', 'model', 'prefix_store', 'serving', 'sizer']",
    ]
    assert str(info.value).startswith("11 problems:\n- `cache.quant_type`")
    assert isinstance(info.value, ValueError)


def test_checks_across_keys_are_reported_alongside_a_broken_section():
    data = {"cache": {"group_size": 32, "residual_length": 48}, "serving": {"http": {"port": -1}}, "sizer": {}}
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.errors == [
        "`cache.residual_length` has to be a multiple of `group_size` (32) but got 48",
        "`serving.http.port` has to be in [0, 65535] but got -1",
        "`sizer` sizes the prefix store's budget; it needs a `prefix_store` section too",
    ]


def test_a_file_reports_every_problem_under_its_name(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("cache:\n  sink_tokens: -1\nserving:\n  http: {host: ''}\n")
    with pytest.raises(ConfigError, match=r"two.yaml: 2 problems:\n- `cache.sink_tokens` has to be >= 0 but got -1\n"
                                          r"- `serving.http.host` has to be an address to bind"):
        load_config(path)


def test_a_section_built_directly_reports_every_problem():
    with pytest.raises(ConfigError) as info:
        CacheConfig(quant_type="int5", residual_length=True, attention="eager", cpu_kernel="on", unknown=1)
    assert info.value.errors == [
        "`quant_type` has to be one of ['int8', 'int4', 'int2', 'mixed'] but got 'int5'",
        "`residual_length` has to be of type int but got bool: True",
        "`attention` has to be one of ['fused', 'dequantize'] but got 'eager'",
        "`cpu_kernel` has to be one of ['auto', 'off'] but got 'on'",
        f"unknown key(s) ['unknown'] in `CacheConfig`; allowed keys are {sorted(f.name for f in fields(CacheConfig))}",
    ]


@pytest.mark.parametrize(
    "value,accepted",
    [(1, True), (1.5, True), (True, False), ("1.5", False), (None, False)],
)
def test_a_number_takes_ints_but_not_bools_or_strings(value, accepted):
    data = {"serving": {"rate_limit": {"rate_per_s": value}}}
    if accepted:
        assert parse_config(data).serving.rate_limit.rate_per_s == float(value)
    else:
        with pytest.raises(ConfigError, match=r"`serving.rate_limit.rate_per_s` has to be of type float but got"):
            parse_config(data)


@pytest.mark.parametrize("value", [4.0, True, "4"])
def test_bits_are_exact_integers(value):
    with pytest.raises(ConfigError, match=rf"`cache.key_bits` has to be one of \[2, 4, 8\] or null but got {value!r}"):
        parse_config({"cache": {"key_bits": value}})


def _float_keys() -> list[str]:
    """Every key of a float setting, as a dotted path."""
    keys, pending = [], [("", PluginConfig)]
    while pending:
        where, cls = pending.pop()
        for name, hint in typing.get_type_hints(cls).items():
            args = typing.get_args(hint) or (hint,)
            inner = [a for a in args if is_dataclass(a)]
            if inner:
                pending.append((f"{where}{name}.", inner[0]))
            elif float in args:
                keys.append(f"{where}{name}")
    return sorted(keys)


def _nested(key: str, value: object) -> dict:
    data: dict = {"prefix_store": {}}
    *sections, name = key.split(".")
    target = data
    for s in sections:
        target = target.setdefault(s, {})
    target[name] = value
    return data


def test_every_float_setting_is_found():
    keys = set(_float_keys())
    assert len(keys) == 37 and {"cache.clip_percentile", "cache.max_size_mb", "serving.api.batch_wait_ms",
                                "distributed.migration_time_budget_ms", "distributed.migration_initial_mb_per_s",
                                "distributed.verify_sample_rate"} <= keys


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=rf"^`{re.escape(key)}` has to be a finite number but got {value!r}$"):
        parse_config(_nested(key, value))


def test_the_hash_ring_default_agrees_with_the_config():
    # hash_ring.py imports nothing of the package (a test runs the file alone), so it restates this one default
    from hf_kvcache_plugin.distributed.hash_ring import ConsistentHashRing

    assert inspect.signature(ConsistentHashRing).parameters["virtual_nodes"].default == DistributedConfig.virtual_nodes
