"""The /healthz, /readyz, /metrics endpoint over loopback (port 0)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hf_kvcache_plugin import HealthServerConfig
from hf_kvcache_plugin.resilience import CheckResult, HealthChecker, HealthServer, ServingMetrics


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


@pytest.fixture
def served():
    checker, metrics = HealthChecker(), ServingMetrics()
    server = HealthServer(checker, metrics, host="127.0.0.1", port=0).start()
    yield checker, metrics, server
    server.stop()


def test_binds_loopback_on_a_free_port(served):
    _, _, server = served
    host, port = server.address
    assert host == "127.0.0.1" and port > 0
    assert server.url == f"http://127.0.0.1:{port}"


def test_readiness_and_liveness_codes_follow_the_status(served):
    checker, _, server = served
    state = {"memory": CheckResult.healthy("memory 40% used (low)")}
    checker.register("memory", lambda: state["memory"])
    assert get(server.url + "/readyz")[:2] == (200, "application/json")
    state["memory"] = CheckResult.degraded("memory 88% used (high)")
    code, _, body = get(server.url + "/readyz")
    assert code == 200 and json.loads(body)["status"] == "degraded"
    state["memory"] = CheckResult.unhealthy("memory 97% used (critical)")
    code, _, body = get(server.url + "/readyz")
    assert code == 503
    assert json.loads(body) == {
        "status": "unhealthy",
        "reasons": ["memory: memory 97% used (critical)"],
        "checks": {"memory": {"status": "unhealthy", "reason": "memory 97% used (critical)"}},
    }
    code, _, body = get(server.url + "/healthz")  # liveness ignores readiness-only checks
    assert code == 200 and json.loads(body)["status"] == "healthy"


def test_metrics_are_prometheus_text(served):
    _, metrics, server = served
    metrics.hits.labels("store").inc(4)
    code, content_type, body = get(server.url + "/metrics")
    assert code == 200 and content_type.startswith("text/plain; version=")
    families = text_string_to_metric_families(body)
    samples = {s.name: s.value for f in families for s in f.samples if s.labels.get("component") == "store"}
    assert samples["hf_kvcache_hits_total"] == 4


def test_unknown_path_is_404_listing_the_paths(served):
    code, _, body = get(served[2].url + "/nope?x=1")
    assert code == 404 and json.loads(body)["paths"] == ["/healthz", "/readyz", "/metrics"]


def test_lifecycle_and_config():
    server = HealthServer.from_config(HealthServerConfig(port=0), HealthChecker())
    with pytest.raises(ValueError, match="not started"):
        server.address
    with server:
        with pytest.raises(ValueError, match="already serves"):
            server.start()
        assert get(server.url + "/healthz")[0] == 200
    server.stop()  # idempotent
    with pytest.raises(ValueError, match=r"`port` has to be in \[0, 65535\]"):
        HealthServer(HealthChecker(), port=-1)
