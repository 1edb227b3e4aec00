"""5 ranks on loopback with injected faults, for tests/test_fault_injection_cluster.py.

    python tests/fault_cluster.py OUT_DIR [--timeout SECONDS]

Forked like tests/coordinator_cluster.py (the c10d store hosted here, on
loopback; a per-launch secret in the environment); the faults are those of
benchmarks/cluster_faults.py, which benchmarks/soak_cluster.py repeats for
minutes. Ranks 0 and 1 are honest;
the others misbehave while the honest ones serve ``ROUNDS`` batches:

- rank 2 sends bad data: in round 1 one signed migration batch to each honest
  rank with an entry of NaN scales and one with a single layer; from then on
  every message it posts is either unsigned or altered after signing (a bit
  flipped in transit), so its views, results and directory are all refused;
- rank 3 is SIGKILLed mid-round: right after posting its round-2 view (the
  others route prompts to it and wait for results that never come);
- rank 4's main thread stalls for good after posting its round-2 view, while
  its heartbeat thread keeps running.

The honest ranks' prompts are chosen before the launch: prompts whose greedy
tokens are no near-ties (benchmarks/cluster_faults.py ``reference_tokens``:
a top-2 logit margin of at least ``MARGIN`` at every step in a plain
single-process run) and come out the same with every way a prefix can be
reused here (no hit, the first chunk, both chunks stored
either way), so legitimate reuse cannot change them and any difference is a
fault getting through. Each honest rank writes
``OUT_DIR/rank<r>.json``: its outputs, the single-process reference, the time
each request took, its coordinator's stats and metrics.
"""

from __future__ import annotations

import os

# before torch is imported: forked ranks must not inherit an OpenMP thread pool
os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
from hf_kvcache_plugin import DistributedConfig, PrefixStore, attach_prefix_cache  # noqa: E402
from hf_kvcache_plugin.distributed import attach_coordinator, generate_new_tokens  # noqa: E402
from hf_kvcache_plugin.resilience import ServingMetrics  # noqa: E402
from tests.coordinator_cluster import load_model  # noqa: E402

WORLD = 5
HONEST = (0, 1)
CORRUPT, KILLED, STALLED = 2, 3, 4
ROUNDS = 4
BATCH = 2
PREFIXES = 4
CONFIG = dict(namespace="faults", replication_factor=1, heartbeat_interval_s=0.1, heartbeat_timeout_s=1.0,
              round_deadline_s=4.0, startup_timeout_s=30.0, breaker={"fail_max": 2, "reset_timeout_s": 300.0})


def workloads(model) -> tuple[dict[int, list[list[list[int]]]], dict[int, list[list[list[int]]]]]:
    """Per rank: ``ROUNDS`` batches of prompts (a shared 2-chunk beginning plus a suffix of the rank's own), and
    for the honest ranks the reference outputs (only prompts with no near-tie are kept)."""
    shared = torch.Generator().manual_seed(1234)
    prefixes = [torch.randint(3, 500, (2 * CHUNK,), generator=shared).tolist() for _ in range(PREFIXES)]
    batches, references = {}, {}
    for rank in range(WORLD):
        own = torch.Generator().manual_seed(100 + rank)
        prompts, outputs = [], []
        while len(prompts) < ROUNDS * BATCH:
            prefix = prefixes[int(torch.randint(PREFIXES, (1,), generator=own))]
            prompt = prefix + torch.randint(3, 500, (int(torch.randint(5, 12, (1,), generator=own)),),
                                            generator=own).tolist()
            if rank in HONEST:
                tokens = reference_tokens(model, prompt)
                if tokens is None:
                    continue
                outputs.append(tokens)
            prompts.append(prompt)
        batches[rank] = [prompts[i:i + BATCH] for i in range(0, len(prompts), BATCH)]
        references[rank] = [outputs[i:i + BATCH] for i in range(0, len(outputs), BATCH)]
    return batches, references


def run_rank(rank: int, model, batches, references, out_dir: Path) -> None:
    hook = attach_prefix_cache(model, PrefixStore(max_size_mb=64, chunk_size=CHUNK), CACHE)
    metrics = ServingMetrics()
    config = DistributedConfig(**CONFIG)
    if rank == CORRUPT:
        generate_new_tokens(model, batches[rank][0], 0, **GENERATE)  # real entries to damage
    coordinator = attach_coordinator(hook, config, generate_kwargs=GENERATE, metrics=metrics)
    if rank == CORRUPT:
        payload = bad_batch(hook.store, ["nan_scales", "one_layer"])
        for target in HONEST:  # signed, announced in the round-1 view: the honest ranks import and refuse it
            coordinator.entry_exchange.migrations_sent[target] = 1
            coordinator.transport.post(coordinator.entry_exchange._batch_key(rank, target, 1), payload)
        after_view(coordinator, lambda number: corrupt_posts(coordinator) if number == 1 else None)
    elif rank == KILLED:
        after_view(coordinator, lambda number: os.kill(os.getpid(), signal.SIGKILL) if number == 2 else None)
    elif rank == STALLED:
        after_view(coordinator, lambda number: time.sleep(3600) if number == 2 else None)
    outputs, seconds = [], []
    for batch in batches[rank]:
        started = time.monotonic()
        outputs.append(coordinator.generate(batch))
        seconds.append(time.monotonic() - started)
        print(f"rank {rank}: round {coordinator.messages.number} answered in {seconds[-1]:.1f} s", file=sys.stderr)
    if rank not in HONEST:
        coordinator.close()
        return
    heartbeat = coordinator.transport.key("heartbeat", STALLED)
    beats = coordinator.transport.add(heartbeat, 0)
    time.sleep(5 * config.heartbeat_interval_s)  # a live heartbeat thread would beat ~5 times meanwhile
    stalled_beats = coordinator.transport.add(heartbeat, 0) - beats
    stats = coordinator.stats()
    coordinator.close()

    def metric(name: str, **labels: str) -> float:
        return metrics.value(name, **labels) or 0

    report = {
        "outputs": outputs,
        "reference": references[rank],
        "seconds": seconds,
        "stats": stats,
        "stalled_rank_beats_after_rounds": stalled_beats,
        "breaker_opens": {peer: metric("hf_kvcache_breaker_opens_total", breaker=f"rank{rank}->peer{peer}")
                          for peer in (CORRUPT, KILLED, STALLED)},
        "dropped": {reason: sum(metric("hf_kvcache_cluster_messages_dropped_total", rank=str(rank), peer=str(p),
                                       reason=reason) for p in range(WORLD))
                    for reason in ("unsigned", "bad_signature", "wrong_sender", "stale", "oversized", "malformed")},
        "requests": {outcome: metric("hf_kvcache_requests_total", entry_point="coordinator", outcome=outcome)
                     for outcome in ("served", "degraded", "failed")},
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model()
    started = time.monotonic()
    batches, references = workloads(model)
    print(f"workloads and references in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return launch_ranks(WORLD, lambda rank: run_rank(rank, model, batches, references, args.out_dir), args.timeout,
                        waited=list(HONEST))


if __name__ == "__main__":
    sys.exit(main())
