"""``hf-kvcache serve --http`` in front of a 3-rank launch (tests/http_cluster.py): rank 0 answers HTTP, each
request is served by the rank holding its prefix, answers equal a single-process server's, and a killed rank's
requests are still answered. One launch; each test checks one part of what it recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .test_coordinator_processes import run_launcher

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "tests" / "http_cluster.py"
LAUNCHER_TIMEOUT_S = 240  # a bound against hangs, not a speed figure


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("http_cluster")
    run_launcher(LAUNCH, out, LAUNCHER_TIMEOUT_S)
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(3)}


def test_streamed_answers_equal_a_single_process_server(launch):
    front = launch[0]
    assert len(front["reference"]) >= 4 and all(front["reference"])
    assert front["routed"] == front["reference"]


def test_requests_sharing_a_prefix_land_on_the_rank_that_holds_it(launch):
    from .http_cluster import BEGINNINGS, ENDINGS

    routes = launch[0]["routes"]
    assert len(routes) == len(BEGINNINGS) * len(ENDINGS)
    for b in range(len(BEGINNINGS)):
        first, *later = routes[b * len(ENDINGS) : (b + 1) * len(ENDINGS)]
        assert first[1] == "placement"  # nothing stored yet: the ring owner of the first chunk
        for server, reason, hit_chunks in later:
            assert (server, reason) == (first[0], "prefix") and hit_chunks >= 2
    # the work is spread: every rank served a beginning, and the workers reused what they stored
    assert {server for server, _, _ in routes} == {0, 1, 2}
    for rank in (1, 2):
        served = sum(1 for server, _, _ in routes if server == rank)
        assert launch[rank]["stats"]["served_for_others"] >= served > 0
        assert launch[rank]["hook"]["hit_tokens"] > 0


def test_a_killed_rank_loses_no_request(launch):
    front = launch[0]
    assert front["after_kill"] == front["reference"]
    assert front["peers_alive"] == {"rank1": True, "rank2": False}
    assert front["stats"]["breakers"]["2"] == "open"
    # after the first round that missed it, rank 2 is off every plan
    assert all(server != 2 for server, _, _ in front["routes_after_kill"][1:])
    # whatever was routed to rank 2 when it died was recomputed on rank 0
    routed_to_dead = sum(1 for server, _, _ in front["routes_after_kill"] if server == 2)
    assert front["stats"].get("served_local_fallback", 0) == routed_to_dead
    # rank 1 saw it go too, and served on
    assert launch[1]["stats"]["breakers"]["2"] == "open"


# ---------------------------------------------------------------------- the parts, in one process
def test_a_view_carries_a_length_and_a_bad_one_is_refused():
    from hf_kvcache_plugin.distributed.payloads import PayloadError, encode_json
    from hf_kvcache_plugin.distributed.wire import parse_view

    view = {"node": {"node_id": 1, "address": "", "capacity_mb": 64.0, "state": "active", "port": None},
            "prompts": [[3, 4, 5]], "directory_version": 0, "migrations": {}, "evictions": 0}  # fmt: skip
    assert parse_view(encode_json(view), 1, 100)[0].max_new_tokens is None  # an older peer's view
    assert parse_view(encode_json({**view, "max_new_tokens": 6}), 1, 100)[0].max_new_tokens == 6
    for bad, problem in ((0, "greater than or equal to 1"), ("6", "valid integer"), (True, "valid integer")):
        with pytest.raises(PayloadError, match=problem):
            parse_view(encode_json({**view, "max_new_tokens": bad}), 1, 100)


def test_the_length_reaches_serve_batch_on_every_path():
    from hf_kvcache_plugin import NodeInfo
    from hf_kvcache_plugin.distributed import CacheCoordinator

    asked = []

    def serve_batch(prompts, max_new_tokens=3):
        asked.append(max_new_tokens)
        return [[7] * max_new_tokens for _ in prompts]

    coordinator = CacheCoordinator(NodeInfo(0), serve_batch=serve_batch)
    assert coordinator.generate([[1, 2]], max_new_tokens=5) == [[7] * 5]
    assert coordinator.generate([[1, 2]]) == [[7] * 3]  # none named: serve_batch's own
    assert asked == [5, 3]


def test_replayed_tokens_stream_and_end_rows_as_generate_would():
    from hf_kvcache_plugin.app.batcher import GenerationJob, _BatchWatcher, _Row
    from hf_kvcache_plugin.app.http_cluster import RoutedGeneration
    from hf_kvcache_plugin.app.models import load_model

    from .conftest import REAL_MODEL

    _, tokenizer = load_model(str(REAL_MODEL), "cpu")
    texts, ends = {0: "", 1: ""}, {}
    job = GenerationJob("r", [[1, 400], [1, 401]], 4, on_text=lambda r, t: texts.__setitem__(r, texts[r] + t),
                        on_end=lambda r, e: ends.__setitem__(r, e), on_error=lambda e: None)  # fmt: skip
    rows = [_Row(job, i, ids, tokenizer, lambda end: None) for i, ids in enumerate(job.rows)]
    eos = tokenizer.eos_token_id
    outputs = [[300, 301, eos], [302, 303, 304, 305]]  # row 0 ends at EOS, row 1 at its max_tokens
    RoutedGeneration._replay(outputs, [_BatchWatcher(rows, frozenset([eos]), None)], pad=0)
    assert (ends[0].finish_reason, ends[0].completion_tokens) == ("stop", 3)
    assert (ends[1].finish_reason, ends[1].completion_tokens) == ("length", 4)
    for row, out in zip((0, 1), outputs):
        whole = tokenizer.decode([1, 400 + row] + [t for t in out if t != eos], skip_special_tokens=True)
        assert texts[row] == whole[len(tokenizer.decode([1, 400 + row], skip_special_tokens=True)):]


def test_routing_needs_a_launch():
    from hf_kvcache_plugin import NodeInfo
    from hf_kvcache_plugin.app.http_cluster import RoutedGeneration, serve_worker
    from hf_kvcache_plugin.distributed import CacheCoordinator

    alone = CacheCoordinator(NodeInfo(0), serve_batch=lambda prompts: prompts)
    with pytest.raises(ValueError, match="needs a coordinator with a transport"):
        RoutedGeneration(alone, local=lambda *a, **k: None)
    with pytest.raises(ValueError, match="runs on ranks other than 0"):
        serve_worker(alone)
