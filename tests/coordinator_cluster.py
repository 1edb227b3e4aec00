"""A 3-rank cluster on localhost for tests/test_coordinator_processes.py.

    python tests/coordinator_cluster.py OUT_DIR [--timeout SECONDS]

Does what ``torchrun --nproc_per_node 3`` does (``launch_ranks`` in
benchmarks/cluster_faults.py): this process imports everything and loads the
model once, forks the ranks and hosts the c10d store they rendezvous on. Each rank initialises a
gloo process group and runs, each scenario in its own coordinator namespace:

- ``routing``: the same workload with independent stores, then coordinated;
- ``dead_peer``: rank 2 stops itself (SIGSTOP) while serving a round that the
  others routed prompts to; ranks 0 and 1 go on;
- ``drain``: rank 1 drains into rank 0 (rank 2 is stopped by then).

Each rank writes what it saw to ``OUT_DIR/rank<r>.json`` after each scenario.
This process exits 0 when ranks 0 and 1 did, after killing rank 2, and kills
every rank still running at ``--timeout``.
"""

from __future__ import annotations

import os

# before torch is imported: forked ranks must not inherit an OpenMP thread pool
os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hf_kvcache_plugin import CacheConfig, DistributedConfig, PrefixStore, attach_prefix_cache  # noqa: E402
from hf_kvcache_plugin.distributed import attach_coordinator, generate_new_tokens  # noqa: E402
from hf_kvcache_plugin.embedded import embedded_model_path  # noqa: E402
from hf_kvcache_plugin.resilience import ServingMetrics  # noqa: E402

from benchmarks.cluster_faults import launch_ranks  # noqa: E402

WORLD = 3
CHUNK = 32
NEW_TOKENS = 4
PREFIXES = 6  # shared prompt beginnings of 2 chunks each
STORE_MB = 0.12  # about 4 prefixes of stories260K (15 KiB per chunk at int8): no store holds them all
ROUNDS = 6
BATCH = 3
DRAIN_STEP_BYTES = 5 * 15 * 2**10  # about 5 entries per migration step: the handover takes several steps
GENERATE = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def load_model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(embedded_model_path()).eval()


def workload(seed: int) -> list[list[list[int]]]:
    """Batches of prompts: one of a few shared 2-chunk beginnings plus a suffix of this rank's own."""
    shared = torch.Generator().manual_seed(1234)
    prefixes = [torch.randint(3, 500, (2 * CHUNK,), generator=shared).tolist() for _ in range(PREFIXES)]
    own = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(ROUNDS):
        batch = []
        for _ in range(BATCH):
            prefix = prefixes[int(torch.randint(PREFIXES, (1,), generator=own))]
            length = int(torch.randint(5, 12, (1,), generator=own))
            batch.append(prefix + torch.randint(3, 500, (length,), generator=own).tolist())
        batches.append(batch)
    return batches


class Rank:
    def __init__(self, rank: int, model, out_dir: Path):
        self.rank, self.model, self.out_dir = rank, model, out_dir
        self.report: dict = {"rank": rank}
        self.began = time.monotonic()
        self.hook = None
        self.metrics = None

    def save(self) -> None:
        self.report.setdefault("seconds_at_save", []).append(round(time.monotonic() - self.began, 2))
        path = self.out_dir / f"rank{self.rank}.json"
        path.with_suffix(".tmp").write_text(json.dumps(self.report))
        path.with_suffix(".tmp").replace(path)

    def fresh_hook(self, max_size_mb: float = STORE_MB):
        if self.hook is not None:
            self.hook.detach()
        self.hook = attach_prefix_cache(self.model, PrefixStore(max_size_mb=max_size_mb, chunk_size=CHUNK),
                                        CacheConfig(quant_type="int8", group_size=8, residual_length=32))
        return self.hook

    def coordinator(self, namespace: str, wait_for: int | None = None, **overrides):
        config = DistributedConfig(namespace=namespace, replication_factor=1, heartbeat_interval_s=0.1,
                                   heartbeat_timeout_s=1.0, round_deadline_s=20.0, startup_timeout_s=20.0,
                                   breaker={"fail_max": 2, "reset_timeout_s": 120.0}, **overrides)
        self.metrics = ServingMetrics()
        return attach_coordinator(self.hook, config, generate_kwargs=GENERATE, wait_for=wait_for, metrics=self.metrics)

    def run(self) -> None:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
        batches = workload(seed=100 + self.rank)
        self.routing(batches)
        self.dead_peer(batches)
        self.drain(batches)
        dist.destroy_process_group()

    def routing(self, batches) -> None:
        hook = self.fresh_hook()
        independent = [generate_new_tokens(self.model, batch, 0, **GENERATE) for batch in batches]
        self.report["independent"] = {"outputs": independent, **{k: hook.stats()[k] for k in ("hit_tokens", "prompt_tokens")}}
        hook = self.fresh_hook()
        coordinator = self.coordinator("routing")
        outputs, served_by = [], []
        for batch in batches:
            outputs.append(coordinator.generate(batch))
            served_by.append([coordinator.last_routes[(self.rank, i)].server for i in range(len(batch))])
        roots = [[coordinator.prompt_keys(p)[0] for p in batch] for batch in batches]
        self.report["coordinated"] = {
            "outputs": outputs,
            "served_by": served_by,
            "roots": [[r.hex() for r in batch] for batch in roots],
            "owners": [[coordinator.get_placement(r)[0] for r in batch] for batch in roots],
            "stats": coordinator.stats(),
            **{k: hook.stats()[k] for k in ("hit_tokens", "prompt_tokens")},
        }
        coordinator.close()
        self.save()

    def dead_peer(self, batches) -> None:
        self.fresh_hook()
        coordinator = self.coordinator("dead_peer")
        if self.rank == 2:
            model = self.model

            def stop_while_serving(prompts):
                # the others routed prompts here this round: they must notice and recompute them
                os.kill(os.getpid(), signal.SIGSTOP)
                return generate_new_tokens(model, prompts, 0, **GENERATE)

            coordinator.generate(batches[0])
            coordinator.serve_batch = stop_while_serving
            coordinator.generate(batches[1])
            return  # not reached: the launcher kills this process
        started = time.monotonic()
        answered = [coordinator.generate(batch) for batch in batches]
        self.report["dead_peer"] = {
            "answered": [len(o) for o in answered],
            "asked": [len(b) for b in batches],
            "all_full_length": all(len(seq) == NEW_TOKENS for o in answered for seq in o),
            "seconds": time.monotonic() - started,
            "stats": coordinator.stats(),
            "peers_alive": coordinator.peers_alive(),
            "metrics": {
                "opens": self.metrics.value("hf_kvcache_breaker_opens_total", breaker=f"rank{self.rank}->peer2"),
                "fallbacks": sum(self.metrics.value("hf_kvcache_fallbacks_total", component="coordinator",
                                                    operation="generate", reason=reason) or 0
                                 for reason in ("peer_unavailable", "store_unavailable")),
                "degraded": self.metrics.value("hf_kvcache_requests_total", entry_point="coordinator",
                                               outcome="degraded") or 0,
            },
        }
        coordinator.close()
        self.save()

    def drain(self, batches) -> None:
        hook = self.fresh_hook(max_size_mb=64.0)
        coordinator = self.coordinator("drain", wait_for=2, migration_mb_per_step=DRAIN_STEP_BYTES / 2**20)
        for batch in batches[:3]:
            coordinator.generate(batch)
        keys_before = sorted(info.key.hex() for info in coordinator.local_entries.entry_infos())
        if self.rank == 1:
            left = coordinator.drain(timeout_s=20.0)
            self.report["drain"] = {"left": left, "keys_before": keys_before, "stats": coordinator.stats()}
        else:
            rounds = 0
            while coordinator.nodes.get(1) is not None and coordinator.nodes[1].state.value != "offline" and rounds < 200:
                coordinator.step()
                rounds += 1
            keys_after = sorted(info.key.hex() for info in coordinator.local_entries.entry_infos())
            self.report["drain"] = {"keys_after": keys_after, "rounds": rounds, "stats": coordinator.stats()}
        coordinator.close()
        self.save()


def launcher_args(timeout_s: float) -> argparse.Namespace:
    """``OUT_DIR [--timeout SECONDS]`` of a launcher script; OUT_DIR is created."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--timeout", type=float, default=timeout_s)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    return args


def main() -> int:
    args = launcher_args(45.0)
    model = load_model()
    return launch_ranks(WORLD, lambda rank: Rank(rank, model, args.out_dir).run(), args.timeout, waited=[0, 1])


if __name__ == "__main__":
    sys.exit(main())
