"""The `serving:` YAML section: defaults, and bad input that names the key."""

from __future__ import annotations

import pytest

from hf_kvcache_plugin import ServingConfig, load_config, parse_config


def test_defaults_live_in_the_dataclass_and_bind_to_loopback():
    cfg = parse_config({})
    assert cfg.serving == ServingConfig()
    assert cfg.serving.http.host == "127.0.0.1" and not cfg.serving.http.enabled
    assert not cfg.serving.rate_limit.enabled


def test_a_full_section_parses(tmp_path):
    path = tmp_path / "serving.yaml"
    path.write_text(
        "serving:\n"
        "  breaker: {fail_max: 3, reset_timeout_s: 5, success_threshold: 2}\n"
        "  rate_limit: {enabled: true, rate_per_s: 2.5, burst: 4, on_limit: wait, max_wait_s: 0.5}\n"
        "  health: {memory_high: 0.8, memory_critical: 0.9}\n"
        "  http: {enabled: true, port: 0}\n"
    )
    serving = load_config(path).serving
    assert serving.breaker.fail_max == 3 and serving.breaker.reset_timeout_s == 5.0
    assert serving.rate_limit.on_limit == "wait" and serving.rate_limit.burst == 4
    assert serving.health.memory_critical == 0.9
    assert serving.http.port == 0


@pytest.mark.parametrize(
    "section,message",
    [
        ({"brekaer": {}}, r"unknown key\(s\) \['brekaer'\] in `serving`; allowed keys are \['api', 'breaker', 'health'"),
        ({"breaker": {"fail_max": 0}}, r"`serving.breaker.fail_max` has to be a positive integer but got 0"),
        ({"breaker": {"fail_max": "5"}}, r"`serving.breaker.fail_max` has to be of type int but got str: '5'"),
        ({"breaker": {"reset_timeout_s": 0}}, r"`serving.breaker.reset_timeout_s` has to be in \(0, 86400.0\] but got 0"),
        ({"breaker": {"success_threshold": -1}}, r"`serving.breaker.success_threshold` has to be a positive integer"),
        ({"rate_limit": {"rate_per_s": -1}}, r"`serving.rate_limit.rate_per_s` has to be > 0 but got -1"),
        ({"rate_limit": {"burst": 0}}, r"`serving.rate_limit.burst` has to be a positive integer but got 0"),
        ({"rate_limit": {"on_limit": "drop"}}, r"`serving.rate_limit.on_limit` has to be one of \['reject', 'wait'\] but got 'drop'"),
        ({"rate_limit": {"enabled": "yes"}}, r"`serving.rate_limit.enabled` has to be of type bool but got str"),
        ({"rate_limit": {"max_wait_s": -0.1}}, r"`serving.rate_limit.max_wait_s` has to be in \[0, 86400.0\]"),
        ({"health": {"memory_high": 0.99}}, r"memory thresholds have to satisfy 0 < memory_moderate < memory_high"),
        ({"http": {"port": 70000}}, r"`serving.http.port` has to be in \[0, 65535\] but got 70000"),
        ({"http": {"port": "80"}}, r"`serving.http.port` has to be of type int but got str: '80'"),
        ({"http": {"host": ""}}, r"`serving.http.host` has to be an address to bind"),
        ({"http": [1]}, r"`serving.http` has to be of type mapping but got list"),
        ({"api": {"port": -1}}, r"`serving.api.port` has to be in \[0, 65535\] but got -1"),
        ({"api": {"max_batch_size": 0}}, r"`serving.api.max_batch_size` has to be a positive integer but got 0"),
        ({"api": {"api_keys": "k"}}, r"`serving.api.api_keys` has to be of type list"),
    ],
)
def test_bad_serving_values_name_the_key(section, message):
    with pytest.raises(ValueError, match=message):
        parse_config({"serving": section})


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("serving:\n  breaker: {fail_max: 3\n")
    with pytest.raises(ValueError, match=r"broken.yaml.*is not valid YAML"):
        load_config(path)
