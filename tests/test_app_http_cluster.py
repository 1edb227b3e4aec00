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
