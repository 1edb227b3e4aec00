"""Soak with real processes: two honest ranks serve a stream of requests for a bounded time while three others
misbehave. Not part of the test run (tests/test_fault_injection_cluster.py is its short, asserted sibling).

    python benchmarks/soak_cluster.py --seconds 420      # about 8 minutes with the reference pool
    python benchmarks/soak_cluster.py --quick            # 60 s of rounds

Five ranks forked around a loopback c10d store with a per-launch secret
(``launch_ranks`` in benchmarks/cluster_faults.py), each with a prefix store
and a coordinator (``attach_coordinator``; two replicas of each chain; every
migration batch verified: ``verify_sample_rate: 1``):

- ranks 0 and 1 are honest: each round a batch of prompts drawn from a pool
  (shared 2-chunk beginnings) until ``--seconds`` have passed; every output is
  compared with the plain single-process greedy tokens of its prompt. The pool
  holds only prompts whose greedy tokens no legitimate reuse changes (no
  near-tie, the same however chunks are stored and hit), so any difference
  is a fault getting through;
- rank 2 holds the secret and lies every ``--lie-every`` rounds, in turn: a
  signed batch whose codes are scrambled (well formed: only the recomputation
  catches it), a signed batch with NaN scales, one with a single layer (two
  batches to each honest rank each time), its next two round views unsigned
  and altered after signing. ``--lie-every`` is long enough for the honest
  ranks' breakers to have closed again in between. Otherwise it serves and
  migrates honestly;
- rank 3 is SIGKILLed right after posting its view of round ``--kill-round``;
- rank 4's main thread stalls for ``--stall-s`` seconds right after posting its
  view, every ``--stall-every`` rounds (its heartbeat thread keeps running),
  then goes on: the honest ranks' breakers for it open and recover.

Breakers open after 2 failures and try again after ``--reset-s`` seconds.
Reported: requests (prompts; ``BATCH`` per ``generate`` call, whose outcome
the coordinator counts: served, degraded, failed; escaped: raised), outputs
compared and
wrong (must be 0), faults injected by kind (as the faulty ranks counted
them), messages dropped by reason and breakers opened / recovered per peer
(as the honest ranks counted them), verification (batches, entries, seconds
per entry, batches refused from honest peers: must be 0), RSS of each honest
rank after warm-up and at the end, with a trace. JSON to
benchmarks/results/soak_cluster[_quick].json.
"""

from __future__ import annotations

import os

# before torch is imported: forked ranks must not inherit an OpenMP thread pool
os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.cluster_faults import (  # noqa: E402
    CACHE,
    CHUNK,
    GENERATE,
    after_view,
    bad_batch,
    corrupt_posts,
    launch_ranks,
    reference_tokens,
)
from benchmarks.records import format_table, machine  # noqa: E402
from hf_kvcache_plugin import DistributedConfig, PrefixStore, attach_prefix_cache  # noqa: E402
from hf_kvcache_plugin.distributed import attach_coordinator  # noqa: E402
from hf_kvcache_plugin.embedded import embedded_model_path  # noqa: E402
from hf_kvcache_plugin.resilience import ServingMetrics  # noqa: E402

WORLD = 5
HONEST = (0, 1)
LIAR, KILLED, STALLED = 2, 3, 4
BATCH = 2
PREFIXES = 6
LIES = ("scrambled", "nan_scales", "one_layer", "unsigned_and_bit_flipped")
DROP_REASONS = ("unsigned", "bad_signature", "wrong_sender", "stale", "oversized", "malformed", "verification")


def prompt_pool(model, size: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """``size`` prompts (a shared 2-chunk beginning plus a suffix) that no legitimate reuse changes, and their
    single-process greedy tokens."""
    shared = torch.Generator().manual_seed(seed)
    prefixes = [torch.randint(3, 500, (2 * CHUNK,), generator=shared).tolist() for _ in range(PREFIXES)]
    own = torch.Generator().manual_seed(seed + 1)
    prompts, references = [], []
    while len(prompts) < size:
        prefix = prefixes[int(torch.randint(PREFIXES, (1,), generator=own))]
        suffix = torch.randint(3, 500, (int(torch.randint(5, 12, (1,), generator=own)),), generator=own).tolist()
        tokens = reference_tokens(model, prefix + suffix)
        if tokens is not None:
            prompts.append(prefix + suffix)
            references.append(tokens)
    return prompts, references


def write_json(path: Path, data: dict) -> None:
    path.with_suffix(".tmp").write_text(json.dumps(data))
    path.with_suffix(".tmp").replace(path)


class FaultLog:
    """What a faulty rank injected, by kind, kept on disk (the launcher kills it without warning)."""

    def __init__(self, out_dir: Path, rank: int):
        self.path, self.counts = out_dir / f"faults_rank{rank}.json", {}

    def add(self, kind: str, count: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + count
        write_json(self.path, self.counts)


def run_rank(rank: int, model, pool, references, args, out_dir: Path) -> None:
    torch.set_num_threads(1)
    hook = attach_prefix_cache(model, PrefixStore(max_size_mb=args.store_mb, chunk_size=CHUNK), CACHE)
    metrics = ServingMetrics()
    # two replicas: every new chain migrates to a second owner, so honest batches are verified all along
    config = DistributedConfig(namespace="soak", replication_factor=2, heartbeat_interval_s=0.1,
                               heartbeat_timeout_s=1.0, round_deadline_s=4.0, startup_timeout_s=60.0,
                               breaker={"fail_max": 2, "reset_timeout_s": args.reset_s}, verify_sample_rate=1.0)
    coordinator = attach_coordinator(hook, config, generate_kwargs=GENERATE, metrics=metrics)
    faults = FaultLog(out_dir, rank)
    rng = random.Random(args.seed * 10 + rank)
    if rank == KILLED:
        def kill(number: int) -> None:
            if number == args.kill_round:
                faults.add("sigkill_mid_round")
                os.kill(os.getpid(), signal.SIGKILL)
        after_view(coordinator, kill)
    elif rank == STALLED:
        def stall(number: int) -> None:
            if number % args.stall_every == 0:
                faults.add("main_thread_stalled")
                time.sleep(args.stall_s)
        after_view(coordinator, stall)
    if rank not in HONEST:
        lies = 0
        while True:  # until the launcher kills it, once the honest ranks are done
            round_no = coordinator.messages.number + 1
            if rank == LIAR and round_no % args.lie_every == 0 and hook.store.entry_infos():
                lie(coordinator, hook, LIES[lies % len(LIES)], faults)
                lies += 1
            coordinator.generate([pool[rng.randrange(len(pool))] for _ in range(BATCH)])
    honest_rank(rank, coordinator, metrics, pool, references, rng, args, out_dir)


def lie(coordinator, hook, kind: str, faults: FaultLog) -> None:
    """One of the liar's faults, announced in its next round view."""
    exchange = coordinator.entry_exchange
    if kind == "unsigned_and_bit_flipped":
        corrupt_posts(coordinator, count=2, on_corrupt=faults.add, views_only=True)
        return
    payload = bad_batch(hook.store, [kind])
    for target in HONEST:
        for _ in range(2):  # two in a row: read one after the other, they open the liar's breaker
            exchange.migrations_sent[target] += 1
            coordinator.transport.post(exchange._batch_key(LIAR, target), payload)
    faults.add(f"signed_batch_{kind}", 2 * len(HONEST))


def honest_rank(rank, coordinator, metrics, pool, references, rng, args, out_dir: Path) -> None:
    process = psutil.Process()
    started = time.monotonic()
    rounds = requests = wrong = escaped = 0
    trace, wrong_details, rss_warm = [], [], None
    while rounds < args.max_rounds and time.monotonic() - started < args.seconds:
        picks = [rng.randrange(len(pool)) for _ in range(BATCH)]
        try:
            outputs = coordinator.generate([pool[i] for i in picks])
        except Exception as exc:  # noqa: BLE001 - counted: the soak measures exactly this
            escaped += 1
            print(f"rank {rank}: round {rounds} escaped: {exc!r}", file=sys.stderr)
            outputs = None
        rounds += 1
        requests += BATCH
        for i, out in zip(picks, outputs or []):
            if out != references[i]:
                wrong += 1
                wrong_details.append({"round": rounds, "prompt": i, "got": out, "expected": references[i]})
        if rounds == 20:
            rss_warm = process.memory_info().rss
        if rounds % 25 == 0:
            trace.append({"round": rounds, "seconds": round(time.monotonic() - started, 1),
                          "rss_mb": round(process.memory_info().rss / 2**20, 1),
                          "breakers": {p: coordinator.transport.breaker_state(p) for p in coordinator.transport.breakers}})
    elapsed = time.monotonic() - started
    rss_end = process.memory_info().rss
    stats = coordinator.stats()
    verifier = coordinator.entry_exchange.verifier.stats
    coordinator.close()

    def metric(name: str, **labels: str) -> int:
        return int(metrics.value(name, **labels) or 0)

    peers = [p for p in range(WORLD) if p != rank]
    report = {
        "rank": rank,
        "rounds": rounds,
        "elapsed_s": round(elapsed, 1),
        "requests": requests,
        "outcomes": {o: metric("hf_kvcache_requests_total", entry_point="coordinator", outcome=o)
                     for o in ("served", "degraded", "failed")},
        "escaped": escaped,
        "outputs_compared": requests - BATCH * escaped,
        "outputs_wrong": wrong,
        "wrong_details": wrong_details[:20],
        "dropped": {reason: sum(metric("hf_kvcache_cluster_messages_dropped_total", rank=str(rank), peer=str(p),
                                       reason=reason) for p in peers) for reason in DROP_REASONS},
        "verification_refusals_from_honest_peers": sum(
            metric("hf_kvcache_cluster_messages_dropped_total", rank=str(rank), peer=str(p), reason="verification")
            for p in HONEST if p != rank),
        "breaker_opens": {p: metric("hf_kvcache_breaker_opens_total", breaker=f"rank{rank}->peer{p}") for p in peers},
        "breaker_recoveries": {p: metric("hf_kvcache_breaker_recoveries_total", breaker=f"rank{rank}->peer{p}")
                               for p in peers},
        "verification": verifier,
        "migration": {k: stats.get(k, 0) for k in ("migrated_in_entries", "rejected_migration_batches",
                                                     "verified_migration_batches", "unverifiable_migration_batches",
                                                     "migrated_out_entries", "served_local_fallback")},
        "rss_warm_mb": round((rss_warm or rss_end) / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "trace": trace,
    }
    write_json(out_dir / f"rank{rank}.json", report)


def summarize(out_dir: Path, args, pool_seconds: float) -> dict:
    ranks = {r: json.loads((out_dir / f"rank{r}.json").read_text()) for r in HONEST}
    faults: dict[str, int] = {}
    for r in (LIAR, KILLED, STALLED):
        path = out_dir / f"faults_rank{r}.json"
        for kind, n in (json.loads(path.read_text()) if path.exists() else {}).items():
            faults[kind] = faults.get(kind, 0) + n
    total = lambda key: sum(rep[key] for rep in ranks.values())  # noqa: E731
    by_reason = {reason: sum(rep["dropped"][reason] for rep in ranks.values()) for reason in DROP_REASONS}
    opens = {f"peer{p}": sum(rep["breaker_opens"].get(str(p), 0) for rep in ranks.values()) for p in (LIAR, KILLED, STALLED)}
    recoveries = {f"peer{p}": sum(rep["breaker_recoveries"].get(str(p), 0) for rep in ranks.values())
                  for p in (LIAR, KILLED, STALLED)}
    checked = sum(rep["verification"]["entries_checked"] for rep in ranks.values())
    seconds = sum(rep["verification"]["seconds"] for rep in ranks.values())
    return {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "reference_pool_s": round(pool_seconds, 1),
        "rounds_per_rank": {r: rep["rounds"] for r, rep in ranks.items()},
        "elapsed_s_per_rank": {r: rep["elapsed_s"] for r, rep in ranks.items()},
        "requests": total("requests"),
        "generate_calls": total("rounds"),
        "calls_served": sum(rep["outcomes"]["served"] for rep in ranks.values()),
        "calls_degraded": sum(rep["outcomes"]["degraded"] for rep in ranks.values()),
        "calls_failed": sum(rep["outcomes"]["failed"] for rep in ranks.values()),
        "calls_escaped": total("escaped"),
        "seconds_per_call": round(sum(rep["elapsed_s"] for rep in ranks.values()) / total("rounds"), 3),
        "outputs_compared": total("outputs_compared"),
        "outputs_wrong": total("outputs_wrong"),
        "faults_injected": faults,
        "messages_dropped": by_reason,
        "breaker_opens": opens,
        "breaker_recoveries": recoveries,
        "batches_checked": sum(rep["verification"]["batches_checked"] for rep in ranks.values()),
        "entries_checked": checked,
        "verification_ms_per_entry": round(seconds / checked * 1e3, 1) if checked else None,
        "verification_refusals": sum(rep["verification"]["mismatches"] for rep in ranks.values()),
        "verification_unverifiable": sum(rep["verification"]["unverifiable"] for rep in ranks.values()),
        "verification_refusals_from_honest_peers": total("verification_refusals_from_honest_peers"),
        "migrated_in_entries": sum(rep["migration"]["migrated_in_entries"] for rep in ranks.values()),
        "rss_mb_after_warmup": {r: rep["rss_warm_mb"] for r, rep in ranks.items()},
        "rss_mb_end": {r: rep["rss_end_mb"] for r, rep in ranks.items()},
        "ranks": ranks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=420.0, help="how long the honest ranks serve")
    parser.add_argument("--max-rounds", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="60 s of rounds, a smaller pool")
    parser.add_argument("--pool", type=int, default=24, help="prompts in the pool (each checked before the run)")
    parser.add_argument("--store-mb", type=float, default=0.25, help="each rank's prefix store (small: it evicts)")
    parser.add_argument("--lie-every", type=int, default=20, help="rounds between the liar's faults")
    parser.add_argument("--kill-round", type=int, default=30)
    parser.add_argument("--stall-every", type=int, default=60, help="rounds between the stalled rank's stalls")
    parser.add_argument("--stall-s", type=float, default=8.0)
    parser.add_argument("--reset-s", type=float, default=5.0, help="breakers try a peer again after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/soak_cluster[_quick].json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.pool = min(args.seconds, 60.0), min(args.pool, 12)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_path()).eval()
    started = time.monotonic()
    pool, references = prompt_pool(model, args.pool, 1234 + args.seed)
    pool_seconds = time.monotonic() - started
    print(f"pool of {len(pool)} prompts and their references in {pool_seconds:.1f} s", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        code = launch_ranks(WORLD, lambda rank: run_rank(rank, model, pool, references, args, out_dir),
                            args.seconds + 180.0, waited=list(HONEST))
        if code != 0:
            print("an honest rank failed; see its traceback above", file=sys.stderr)
            return 1
        summary = summarize(out_dir, args, pool_seconds)
    rows = [{"figure": k, "value": v} for k, v in summary.items() if k not in ("machine", "settings", "ranks")]
    print(format_table(rows, ["figure", "value"]))
    print(f"CPU: {summary['machine']['cpu_model']}, load average {summary['machine']['load_average_1m']}")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"soak_cluster{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    must_be_zero = ("calls_failed", "calls_escaped", "outputs_wrong", "verification_refusals_from_honest_peers")
    return 0 if all(summary[k] == 0 for k in must_be_zero) else 1


if __name__ == "__main__":
    sys.exit(main())
