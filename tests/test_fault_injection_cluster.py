"""Real processes with faults injected (tests/fault_cluster.py: 5 ranks, loopback, one store, signed traffic): a
rank sending corrupted, unsigned and invalid payloads, a rank SIGKILLed mid-round, a rank whose main thread
stalls. The honest ranks answer every request, in bounded time (the launcher's and this module's timeouts kill
and fail a run that hangs; no wall-clock threshold is asserted, the machine is shared), with exactly the
outputs of a plain single-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_coordinator_processes import run_launcher

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "fault_cluster.py"
LAUNCHER_TIMEOUT_S = 240
HONEST = (0, 1)
CORRUPT, KILLED, STALLED = 2, 3, 4


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("faults")
    run_launcher(CLUSTER, out, LAUNCHER_TIMEOUT_S)
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in HONEST}


def test_every_request_is_answered_with_the_single_process_outputs(reports):
    for rank in HONEST:
        report = reports[rank]
        assert report["requests"]["failed"] == 0
        assert report["requests"]["served"] + report["requests"]["degraded"] == len(report["reference"])
        assert report["outputs"] == report["reference"]  # nothing a faulty peer sent changed a token


def test_each_faulty_rank_is_cut_off_by_its_breaker(reports):
    for rank in HONEST:
        report = reports[rank]
        assert report["breaker_opens"] == {str(CORRUPT): 1, str(KILLED): 1, str(STALLED): 1}, report["breaker_opens"]
        assert report["stats"]["breakers"] == {"1" if rank == 0 else "0": "closed", str(CORRUPT): "open",
                                               str(KILLED): "open", str(STALLED): "open"}
        assert sorted(report["stats"]["ring"]) == list(HONEST)


def test_bad_payloads_are_refused_and_counted(reports):
    for rank in HONEST:
        report = reports[rank]
        # the signed batch of damaged entries was refused, deleted and counted against the sender
        assert report["stats"]["rejected_migration_batches"] == 1 and report["dropped"]["malformed"] >= 1
        assert report["stats"].get("migrated_in_entries", 0) + report["stats"]["rejected_migration_batches"] >= 1
    # unsigned and altered messages were read and dropped (which of them a rank met depends on the routing)
    assert sum(reports[r]["dropped"]["unsigned"] + reports[r]["dropped"]["bad_signature"] for r in HONEST) >= 1


def test_a_stalled_main_thread_stops_its_heartbeat(reports):
    for rank in HONEST:
        # its heartbeat thread still runs, yet does not beat: the main thread made no progress
        assert reports[rank]["stalled_rank_beats_after_rounds"] == 0
