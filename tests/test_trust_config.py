"""Trust boundaries (#14), config: bounded timeouts and sizes, non-UTF-8 files, every problem at once, fuzzing."""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_kvcache_plugin import PrefixStore, create_quantized_kv_cache
from hf_kvcache_plugin.config import CacheConfig, ConfigError, load_config, parse_config
from hf_kvcache_plugin.config.validation import MAX_SECONDS, MAX_SIZE_MB

TIMEOUTS = ["serving.breaker.reset_timeout_s", "serving.rate_limit.max_wait_s", "sizer.interval_s", "sizer.cooldown_s"]
SIZES = ["cache.max_size_mb", "prefix_store.max_size_mb", "sizer.max_size_mb"]


def nested(key: str, value) -> dict:
    data: dict = {"prefix_store": {}} if key.startswith("sizer.") else {}
    *sections, name = key.split(".")
    target = data
    for s in sections:
        target = target.setdefault(s, {})
    target[name] = value
    return data


@pytest.mark.parametrize("key", TIMEOUTS + SIZES)
def test_huge_finite_timeouts_and_sizes_are_refused_by_name(key):
    bound = MAX_SECONDS if key.endswith("_s") else MAX_SIZE_MB
    parse_config(nested(key, bound))  # the bound itself is allowed
    with pytest.raises(ConfigError, match=rf"^`{key}` has to be in [\[(]0, {bound}\]( or null)? but got 1e\+300$"):
        parse_config(nested(key, 1e300))


def test_an_inf_or_huge_budget_is_a_clear_error_not_an_overflow():
    for value in (math.inf, 1e308):
        with pytest.raises(ValueError, match="max_size_mb"):
            create_quantized_kv_cache("int8", num_layers=1, max_size_mb=value)
    cache = create_quantized_kv_cache("int8", num_layers=1, max_size_mb=1.0)
    for value in (math.inf, 1e308, math.nan):
        with pytest.raises(ValueError, match="new_size_mb"):
            cache.resize(value)
    store = PrefixStore(max_size_mb=1.0, chunk_size=16)
    for value in (math.inf, 1e308, math.nan):
        with pytest.raises(ValueError, match=r"`new_size_mb` has to be a number in \[0, "):
            store.resize(value)
    assert store.max_size_mb == 1.0


def test_a_file_that_is_not_utf8_is_a_value_error_naming_it(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.yaml' is not UTF-8 text") as info:
        load_config(path)
    assert not isinstance(info.value, UnicodeDecodeError)


def test_model_dependent_checks_report_every_problem_at_once():
    config = CacheConfig(group_size=48, key_axis="token", residual_length=96, skip_layers=[9], layer_overrides={7: {}})
    with pytest.raises(ConfigError) as info:
        config.for_model(2, 64)
    assert [e.split(" ", 1)[0] for e in info.value.errors] == ["`group_size`", "`layer_overrides`", "`skip_layers`"]


def test_checks_across_keys_run_beside_a_refused_key_of_the_same_section():
    data = {"cache": {"quant_type": "int5", "group_size": 4, "residual_length": 7, "typo": 1},
            "serving": {"health": {"memory_moderate": "a", "memory_high": 0.5}}}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.errors[-2:] == [
        "`cache.residual_length` has to be a multiple of `group_size` (4) but got 7 (checked with ['quant_type'] at "
        "their defaults)",
        "memory thresholds have to satisfy 0 < memory_moderate < memory_high < memory_critical <= 1 but got 0.7, 0.5, "
        "0.95 (checked with ['memory_moderate'] at their defaults) (in `serving.health`)",
    ]
    assert len(info.value.errors) == 5  # and the three refused keys themselves


# ---------------------------------------------------------------------- fuzzing: only ConfigError / ValueError
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.binary(max_size=4),
)
_KEYS = st.sampled_from(
    ["model", "cache", "serving", "breaker", "rate_limit", "health", "http", "prefix_store", "sizer", "distributed",
     "quant_type", "group_size", "residual_length", "max_size_mb", "layer_overrides", "skip_layers", "key_bits",
     "reset_timeout_s", "rate_per_s", "max_wait_s", "port", "host", "chunk_size", "interval_s", 0, 3, "x"]
)  # fmt: skip
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
                       max_leaves=12)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _VALUES, max_size=5))
def test_fuzzed_mappings_give_a_config_or_a_config_error(data):
    try:
        parse_config(data)
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_fuzzed_files_give_a_config_or_a_value_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_bytes(blob)
    try:
        load_config(path)
    except ValueError as exc:
        assert str(path) in str(exc)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=4))
def test_fuzzed_yaml_documents_give_a_config_or_a_value_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    try:
        path.write_text(yaml.safe_dump(data))
    except yaml.YAMLError:
        return  # not representable as YAML (e.g. bytes keys); nothing to read back
    try:
        load_config(path)
    except ValueError as exc:
        assert str(path) in str(exc)
