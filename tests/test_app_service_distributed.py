"""The serving layer over the coordinator: peer breakers in ServingMetrics, peers in health, the coordinator's
rate limit and local recompute counted, ``build_service`` with a ``distributed:`` section. One process, a
dict for the c10d store, injected clocks: no sleeps, no second process."""

from __future__ import annotations

import threading

import pybreaker
import pytest

from hf_kvcache_plugin import BreakerConfig, DistributedConfig, NodeInfo, parse_config
from hf_kvcache_plugin.distributed import CacheCoordinator
from hf_kvcache_plugin.distributed.payloads import decode_json, encode_json
from hf_kvcache_plugin.distributed.transport import PeerDead, PeerLeft, StoreTransport
from hf_kvcache_plugin.resilience import HealthStatus, RateLimiter, RateLimitExceeded, ServingMetrics, peers_check
from hf_kvcache_plugin.app.service import build_service

PEER = "rank1->peer0"


class DictStore:
    """The part of ``torch.distributed.Store`` the transport uses, in a dict."""

    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def clone(self) -> "DictStore":
        return self

    def set(self, key: str, value: bytes) -> None:
        with self.lock:
            self.data[key] = bytes(value)

    def get(self, key: str) -> bytes:
        with self.lock:
            return self.data[key]

    def check(self, keys: list[str]) -> bool:
        with self.lock:
            return all(k in self.data for k in keys)

    def add(self, key: str, amount: int) -> int:
        with self.lock:
            value = int(self.data.get(key, b"0")) + amount
            self.data[key] = str(value).encode()
            return value

    def delete_key(self, key: str) -> bool:
        with self.lock:
            return self.data.pop(key, None) is not None


class ManualClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SilentPeerTransport(StoreTransport):
    """A message that is not in the store never comes: its peer is reported dead at once (no polling)."""

    def _wait(self, peer, key, timeout_s, round_no, peer_round, peer_left, delete):
        if peer_left is not None and peer_left(peer):
            raise PeerLeft(peer, "left the cluster")
        data = self._take(key, delete)
        if data is None:
            raise PeerDead(peer, "no heartbeat (test)")
        return self._open(key, data, peer, reraise=True)


def transport(rank: int = 1, *, c10d_store=None, metrics=None, clock=None, **breaker) -> SilentPeerTransport:
    config = BreakerConfig(**{"fail_max": 2, "reset_timeout_s": 10.0, **breaker})
    return SilentPeerTransport(c10d_store or DictStore(), rank, 2, namespace="t", heartbeat_interval_s=10.0,
                               heartbeat_timeout_s=30.0, breaker=config, metrics=metrics, clock=clock or ManualClock())


# ---------------------------------------------------------------------- peer breakers
def test_peer_breakers_take_the_serving_config_and_report_to_serving_metrics(caplog):
    metrics, clock = ServingMetrics(), ManualClock()
    t = transport(metrics=metrics, clock=clock, success_threshold=2)
    breaker = t.breakers[0]
    assert (breaker.fail_max, breaker.reset_timeout, breaker.success_threshold) == (2, 10.0, 2)
    state = lambda s: metrics.value("hf_kvcache_breaker_state", breaker=PEER, hf_kvcache_breaker_state=s)  # noqa: E731
    assert state("closed") == 1 and state("open") == 0

    # leaving and bad input are not failures
    for _ in range(3):
        with pytest.raises(PeerLeft):
            t.receive(0, t.key("m"), 1.0, peer_left=lambda peer: True)
        with pytest.raises(ValueError):
            breaker.call(lambda: int("not a number"))
    assert t.breaker_state(0) == pybreaker.STATE_CLOSED

    with caplog.at_level("WARNING", logger="hf_kvcache_plugin.resilience.breakers"):
        for _ in range(2):
            with pytest.raises(PeerDead):
                t.receive(0, t.key("m"), 1.0)
    assert t.breaker_state(0) == pybreaker.STATE_OPEN and state("open") == 1
    assert metrics.value("hf_kvcache_breaker_opens_total", breaker=PEER) == 1
    assert f"circuit breaker '{PEER}' opened" in caplog.text
    with pytest.raises(pybreaker.CircuitBreakerError):
        t.receive(0, t.key("m"), 1.0)  # refused without a look at the store

    clock.now = 10.0  # the reset timeout on the injected clock: the next call is a trial
    assert t.may_call(0)
    peer = transport(0, c10d_store=t.c10d_store)
    for n in range(2):  # two successes in a row close it again
        peer.post(t.key("m"), b"ok")
        assert t.receive(0, t.key("m"), 1.0) == b"ok"
        assert t.breaker_state(0) == (pybreaker.STATE_HALF_OPEN if n == 0 else pybreaker.STATE_CLOSED)
    assert metrics.value("hf_kvcache_breaker_recoveries_total", breaker=PEER) == 1 and state("closed") == 1
    assert t.events.transitions[(PEER, "open")] == 1  # the coordinator's own stats still see it


def test_distributed_config_gives_the_breaker_thresholds():
    config = parse_config({
        "prefix_store": {},
        "distributed": {"breaker": {"fail_max": 4, "reset_timeout_s": 2.5, "success_threshold": 3}},
    })  # fmt: skip
    assert config.distributed.breaker_config() == BreakerConfig(fail_max=4, reset_timeout_s=2.5, success_threshold=3)
    with pytest.raises(ValueError, match="`breaker.success_threshold` has to be a positive integer but got 0"):
        DistributedConfig(breaker={"success_threshold": 0})
    with pytest.raises(ValueError, match=r"`breaker.reset_timeout_s` has to be in \(0, 86400.0\] but got 0"):
        DistributedConfig(breaker={"reset_timeout_s": 0})


def test_distributed_breaker_keys_left_out_take_the_peer_defaults_and_the_old_keys_name_the_new_ones():
    assert DistributedConfig().breaker == BreakerConfig(fail_max=3, reset_timeout_s=30.0, success_threshold=1)
    partial = parse_config({"prefix_store": {}, "distributed": {"breaker": {"reset_timeout_s": 5}}})
    assert partial.distributed.breaker == BreakerConfig(fail_max=3, reset_timeout_s=5.0, success_threshold=1)
    assert parse_config({}).serving.breaker.fail_max == 5  # the store breakers of `serving:` keep theirs
    with pytest.raises(ValueError, match=r"`distributed.breaker_fail_max` moved to `distributed.breaker.fail_max`"):
        parse_config({"prefix_store": {}, "distributed": {"breaker_fail_max": 4}})


# ---------------------------------------------------------------------- coordinator entry point
def peer_one_announced(store: DictStore) -> None:
    """Rank 1 as rank 0 sees it in round 1: announced, its view posted, and then silent."""
    t = StoreTransport(store, 1, 2, namespace="t", heartbeat_interval_s=10.0, heartbeat_timeout_s=30.0)
    node = NodeInfo(1)
    t.post(t.key("node", 1), node.to_json())
    t.add(t.key("joined"), 1)
    t.add(t.key("round_no", 1), 1)
    view = {"node": decode_json(node.to_json()), "prompts": [], "directory_version": 0,
            "migrations": {}, "evictions": 0}
    t.post(t.key("round", 1, "view", 1), encode_json(view))


def test_a_silent_peer_is_recomputed_locally_counted_and_reported_by_health():
    store, metrics, limit_clock = DictStore(), ServingMetrics(), ManualClock()
    peer_one_announced(store)
    coordinator = CacheCoordinator(
        NodeInfo(0),
        DistributedConfig(heartbeat_interval_s=10.0, heartbeat_timeout_s=30.0, breaker=BreakerConfig(fail_max=1)),
        transport=transport(0, c10d_store=store, metrics=metrics, fail_max=1),
        serve_batch=lambda prompts: [[len(p), p[0]] for p in prompts],
        metrics=metrics,
        limiter=RateLimiter(rate_per_s=1.0, burst=2, clock=limit_clock),
    )
    prompts = [[i + 1] * (i + 2) for i in range(8)]
    expected = [[len(p), p[0]] for p in prompts]
    check = peers_check(coordinator.peers_alive)
    with coordinator.start(wait_for=2):
        assert coordinator.peers_alive() == {"rank1": True} and check().status is HealthStatus.HEALTHY
        assert coordinator.generate(prompts, client="a") == expected  # no prompt lost
        sent = [key for key, route in coordinator.last_routes.items() if route.server == 1]
        assert sent  # the plan gave rank 1 a share, which never came back
        fallbacks = dict(component="coordinator", operation="generate", reason="peer_unavailable")
        assert metrics.value("hf_kvcache_fallbacks_total", **fallbacks) == len(sent)
        assert metrics.value("hf_kvcache_breaker_opens_total", breaker="rank0->peer1") == 1
        assert coordinator.peers_alive() == {"rank1": False}
        result = check()
        assert result.status is HealthStatus.DEGRADED and "['rank1']: serving locally" in result.reason

        # the peer's breaker is open: served here from the start, no fallback
        assert coordinator.generate(prompts, client="a") == expected
        rounds = coordinator.stats()["round"]
        with pytest.raises(RateLimitExceeded, match="client 'a' is over its rate limit"):
            coordinator.generate(prompts, client="a")
        assert coordinator.stats()["round"] == rounds + 1  # it still took part in the round
        assert coordinator.generate(prompts, client="b") == expected  # another client has its own bucket
        limit_clock.now = 1.0
        assert coordinator.generate(prompts, client="a") == expected

    requests = lambda outcome: metrics.value(  # noqa: E731
        "hf_kvcache_requests_total", entry_point="coordinator", outcome=outcome
    )
    assert (requests("degraded"), requests("served"), requests("rate_limited")) == (1, 3, 1)
    with pytest.raises(ValueError, match="`prompts` has to be a list of token id lists"):
        coordinator.generate([["x"]])
    assert requests("invalid") == 1


# ---------------------------------------------------------------------- build_service
def test_build_service_with_a_distributed_section_wires_the_coordinator(model, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    config = parse_config({
        "cache": {"quant_type": "int8", "group_size": 8, "residual_length": 16},
        "prefix_store": {"chunk_size": 16, "max_size_mb": 4},
        "distributed": {},
        "serving": {"rate_limit": {"enabled": True, "rate_per_s": 0.001, "burst": 2}},
    })  # fmt: skip
    prompts = [[5 + (i * 7 + j) % 90 for j in range(40)] for i in range(2)]
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with build_service(model, config, memory_reader=lambda: 0.5, generate_kwargs=kwargs) as svc:
        coordinator = svc.coordinator
        assert coordinator is not None and coordinator.transport is None  # one process: serves locally
        assert svc.checker.names == ["memory", "serving_progress", "breakers", "prefix_store", "peers"]
        report = svc.checker.readiness()
        assert report.status is HealthStatus.HEALTHY and report.checks["peers"].reason == "0 peer(s) reachable"
        assert coordinator.local_entries.prefix_store is svc.store.wrapped  # entries move in and out of the hook's store
        first = coordinator.generate(prompts, client="batch")
        assert coordinator.generate(prompts, client="batch") == first and all(len(o) == 3 for o in first)
        assert len(svc.store) > 0
        with pytest.raises(RateLimitExceeded):
            coordinator.generate(prompts, client="batch")
        # the endpoint's limiter has buckets of its own
        assert svc.endpoint.limiter is not coordinator.limiter and svc.endpoint.limiter.available("batch") == 2
        value = svc.metrics.value
        assert value("hf_kvcache_requests_total", entry_point="coordinator", outcome="served") == 2
        assert value("hf_kvcache_requests_total", entry_point="coordinator", outcome="rate_limited") == 1
        assert svc.breakers == [svc.store.breaker]
    assert coordinator.node.state.value == "offline"  # closing the service leaves the cluster
