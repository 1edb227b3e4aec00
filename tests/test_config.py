"""YAML loading: every shipped config loads and builds a cache; bad input names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_kvcache_plugin import CacheConfig, QuantizedKVCache, load_config, parse_config

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
        ({"cache": {"quant_type": "int3"}}, r"`quant_type` has to be one of \['int8', 'int4', 'int2', 'mixed'\] but got 'int3'"),
        ({"cache": {"key_bits": 3}}, r"`key_bits` has to be one of \[2, 4, 8\] or null but got 3"),
        ({"cache": {"group_size": 32, "residual_length": 48}}, r"`residual_length` has to be a multiple of `group_size` \(32\) but got 48"),
        ({"cache": {"group_size": 0}}, r"`group_size` has to be a positive integer but got 0"),
        ({"cache": {"group_size": 2, "residual_length": 0, "quant_type": "int2"}}, r"multiple of 4 to pack 2-bit"),
        ({"cache": {"sink_tokens": -1}}, r"`sink_tokens` has to be >= 0 but got -1"),
        ({"cache": {"scale_dtype": "fp8"}}, r"`scale_dtype` has to be one of"),
        ({"cache": {"key_axis": "row"}}, r"`key_axis` has to be one of \['channel', 'token'\]"),
        ({"cache": {"clip_percentile": 20}}, r"`clip_percentile` has to be in \(50, 100\]"),
        ({"cache": {"layer_overrides": {"x": {}}}}, r"`cache.layer_overrides` keys have to be layer indices"),
        ({"cache": {"layer_overrides": {0: {"bits": 4}}}}, r"unknown key\(s\) \['bits'\] in `cache.layer_overrides.0`"),
        ({"cache": {"skip_layers": [1, "a"]}}, r"`cache.skip_layers` has to be of type list\[int\]"),
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
