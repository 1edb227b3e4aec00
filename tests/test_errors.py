"""Structured errors: one root (``KVCacheError``) with a machine-readable record, built-in bases kept."""

from __future__ import annotations

import pytest
import torch

from hf_kvcache_plugin import (
    CacheBudgetExceeded,
    ConfigError,
    KVCacheError,
    QuantizedKVCache,
    RateLimiter,
    create_quantized_kv_cache,
    parse_config,
)
from hf_kvcache_plugin.cache_io import SnapshotError
from hf_kvcache_plugin.distributed.transport import PeerDead, PeerTimeout, PeerUnavailable
from hf_kvcache_plugin.resilience.rate_limit import RateLimitExceeded


def raised(fn) -> BaseException:
    with pytest.raises(KVCacheError) as info:
        fn()
    return info.value


def test_a_budget_refusal_is_caught_as_ours_and_as_a_runtime_error_with_its_bytes():
    cache = create_quantized_kv_cache(quant_type="int8", num_layers=1, group_size=8, residual_length=8,
                                      max_size_mb=1e-6, budget_policy="refuse")  # fmt: skip
    err = raised(lambda: cache.store(0, k=torch.randn(1, 2, 16, 16), v=torch.randn(1, 2, 16, 16)))
    assert isinstance(err, CacheBudgetExceeded) and isinstance(err, RuntimeError)
    record = err.to_dict()
    assert record["error"] == "cache_budget_exceeded" and record["type"] == "CacheBudgetExceeded"
    assert record["details"] == {"budget_bytes": 1, "needed_bytes": err.needed_bytes, "held_bytes": 0}
    assert record["message"] == str(err) and "budget `max_size_mb` is 1 bytes" in record["message"]


def test_a_config_error_lists_its_problems_in_the_record():
    err = raised(lambda: parse_config({"cache": {"quant_type": "int5", "group_size": 0}}))
    assert isinstance(err, ConfigError) and isinstance(err, ValueError)
    record = err.to_dict()
    assert record["error"] == "config_invalid" and len(record["details"]["errors"]) == 2
    assert any("quant_type" in e for e in record["details"]["errors"])


def test_a_damaged_snapshot_is_ours_and_a_value_error(tmp_path):
    path = tmp_path / "bad.kvc"
    path.write_bytes(b"not a snapshot")
    err = raised(lambda: QuantizedKVCache.load(path))
    assert isinstance(err, SnapshotError) and isinstance(err, ValueError)
    assert err.to_dict()["error"] == "snapshot_invalid" and err.to_dict()["details"] == {}


def test_a_rate_limit_says_when_to_retry():
    now = [0.0]
    limiter = RateLimiter(rate_per_s=1.0, burst=1, clock=lambda: now[0])
    limiter.acquire("alice")
    err = raised(lambda: limiter.acquire("alice"))
    assert isinstance(err, RateLimitExceeded) and isinstance(err, RuntimeError)
    assert err.to_dict()["error"] == "rate_limited"
    assert err.to_dict()["details"] == {"client": "alice", "retry_after_s": pytest.approx(1.0)}


@pytest.mark.parametrize("cls,code", [(PeerUnavailable, "peer_unavailable"), (PeerDead, "peer_dead"),
                                      (PeerTimeout, "peer_timeout")])  # fmt: skip
def test_peer_errors_name_the_peer(cls, code):
    err = cls(3, "no heartbeat for 5.0 s")
    assert isinstance(err, KVCacheError) and isinstance(err, RuntimeError)
    assert err.to_dict() == {"error": code, "type": cls.__name__, "message": "peer 3: no heartbeat for 5.0 s",
                             "details": {"peer": 3}}  # fmt: skip
