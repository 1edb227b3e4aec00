"""Shared prefix cache across processes vs independent stores, and migration bytes on join / leave.

    python benchmarks/distributed.py --quick     # starts itself under torchrun with 2 CPU processes
    python benchmarks/distributed.py             # more rounds, two store budgets, a larger random model too

Part 1, side by side in one launch: every process gets requests that begin
with one of a few shared prefixes (``--prefixes`` prompts of ``--prefix-chunks``
chunks) and end with a suffix of its own; it serves them

- *independent*: its own prefix store, no coordination (what data-parallel
  ``accelerate`` does today), then
- *coordinated*: a fresh store per process and a ``CacheCoordinator``.

Figures per mode: token hit rate over all served prompts, total wall time
(slowest process), prompts sent to another process. Two store budgets: one
that holds every prefix, one that holds about half (``tight``).

Part 2, join / leave: rank 0 alone stores many prompts' chunks; rank 1 joins;
bytes rank 0 sends vs the 1/N ideal (N=2, replication 1: half of what it
holds) and vs the bytes whose owner changed. Both then serve new prompts;
rank 1 drains: bytes sent vs the bytes only it held (ideal: all of them;
chunks rank 0 already holds are dropped, not sent).
Part 3 repeats join / leave for 8 processes with the planner alone (no I/O).

Writes benchmarks/results/distributed[_quick].json.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hf_kvcache_plugin.embedded import STORIES260K

RESULTS = Path(__file__).resolve().parent / "results"
CHUNK = 32
JOIN_ROUNDS = 30  # rounds both processes take after the join; the handover needs a few
SETTLE_ROUNDS = 4
MIGRATION_MB_PER_STEP = 0.25  # small, so that the handover takes several bounded steps


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, one budget, stories260K only")
    parser.add_argument("--model", default=str(STORIES260K), help="path of the small real model (default: the embedded one)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--prefix-chunks", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=None, help="batches per process (default 8, quick 5)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", default=None)
    return parser.parse_args()


def relaunch_under_torchrun(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--standalone", *sys.argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("launching:", " ".join(command[1:]), flush=True)
    return subprocess.run(command, env=env).returncode


# ---------------------------------------------------------------------- workload and models
def make_model(name: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "random-h512-l8":
        # realistic head shape (head_dim 64): prefill costs enough for reuse to show in time
        config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024)
        return LlamaForCausalLM(config).eval(), 32
    return AutoModelForCausalLM.from_pretrained(name).eval(), 8


def workload(rank: int, prefixes: int, prefix_chunks: int, rounds: int, batch: int) -> list[list[list[int]]]:
    shared = torch.Generator().manual_seed(7)
    beginnings = [torch.randint(3, 500, (prefix_chunks * CHUNK,), generator=shared).tolist() for _ in range(prefixes)]
    own = torch.Generator().manual_seed(1000 + rank)
    batches = []
    for _ in range(rounds):
        rows = []
        for _ in range(batch):
            beginning = beginnings[int(torch.randint(prefixes, (1,), generator=own))]
            rows.append(beginning + torch.randint(3, 500, (int(torch.randint(8, 17, (1,), generator=own)),),
                                                  generator=own).tolist())
        batches.append(rows)
    return batches


def gather(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# ---------------------------------------------------------------------- part 1
def serve_side_by_side(model, group_size: int, batches, store_mb: float, new_tokens: int, namespace: str) -> dict:
    from hf_kvcache_plugin import CacheConfig, DistributedConfig, PrefixStore, attach_prefix_cache
    from hf_kvcache_plugin.distributed import attach_coordinator, generate_new_tokens

    cache_config = CacheConfig(quant_type="int8", group_size=group_size, residual_length=4 * group_size)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    figures = {}
    for mode in ("independent", "coordinated"):
        hook = attach_prefix_cache(model, PrefixStore(max_size_mb=store_mb, chunk_size=CHUNK), cache_config)
        coordinator = None
        if mode == "coordinated":
            config = DistributedConfig(namespace=f"{namespace}", replication_factor=1, heartbeat_timeout_s=10.0,
                                       round_deadline_s=120.0)
            coordinator = attach_coordinator(hook, config, generate_kwargs=kwargs)
        dist.barrier()
        started = time.perf_counter()
        for batch in batches:
            if coordinator is None:
                generate_new_tokens(model, batch, 0, **kwargs)
            else:
                coordinator.generate(batch)
        elapsed = time.perf_counter() - started
        stats = hook.stats()
        row = {"seconds": elapsed, "hit_tokens": stats["hit_tokens"], "prompt_tokens": stats["prompt_tokens"],
               "served": stats["requests"], "store_bytes": hook.store.used_bytes}
        if coordinator is not None:
            c = coordinator.stats()
            row.update(sent_to_others=c.get("sent_to_others", 0), served_for_others=c.get("served_for_others", 0),
                       fallbacks=c.get("served_local_fallback", 0), bytes_posted=c["transport"].get("bytes_posted", 0))
            coordinator.close()
        hook.detach()
        per_rank = gather(row)
        hit = sum(r["hit_tokens"] for r in per_rank)
        total = sum(r["prompt_tokens"] for r in per_rank)
        figures[mode] = {
            "token_hit_rate": hit / total,
            "seconds": max(r["seconds"] for r in per_rank),
            "prompts": sum(r["served"] for r in per_rank),
            "per_rank": per_rank,
        }
    return figures


# ---------------------------------------------------------------------- part 2
def join_and_leave(model, group_size: int, prompts: int, namespace: str) -> dict:
    """Rank 0 alone stores ``prompts`` prompts' chunks; rank 1 joins; both serve ``prompts`` more; rank 1 drains."""
    from hf_kvcache_plugin import CacheConfig, DistributedConfig, PrefixStore, attach_prefix_cache
    from hf_kvcache_plugin.distributed import attach_coordinator
    from hf_kvcache_plugin.distributed.local_entries import root_of

    rank = dist.get_rank()
    cache_config = CacheConfig(quant_type="int8", group_size=group_size, residual_length=4 * group_size)
    hook = attach_prefix_cache(model, PrefixStore(max_size_mb=256, chunk_size=CHUNK), cache_config)
    config = DistributedConfig(namespace=namespace, replication_factor=1, heartbeat_timeout_s=10.0,
                               round_deadline_s=120.0, migration_mb_per_step=MIGRATION_MB_PER_STEP)
    kwargs = dict(max_new_tokens=1, do_sample=False)
    generator = torch.Generator().manual_seed(99)
    before_join = [torch.randint(3, 500, (2 * CHUNK + 1,), generator=generator).tolist() for _ in range(prompts)]
    after_join = [torch.randint(3, 500, (2 * CHUNK + 1,), generator=generator).tolist() for _ in range(prompts)]
    mine_after = after_join[rank::2]
    bound = int(MIGRATION_MB_PER_STEP * 2**20)
    result: dict = {}
    # rank 1 joins a cluster of one: rank 0 starts without waiting for it
    if rank == 1:
        dist.barrier()
    coordinator = attach_coordinator(hook, config, generate_kwargs=kwargs, wait_for=rank + 1)
    if rank == 0:
        for start in range(0, len(before_join), 16):
            coordinator.generate(before_join[start : start + 16])
        held = hook.store.used_bytes
        dist.barrier()  # rank 1 joins now
    for _ in range(JOIN_ROUNDS):  # both take the same rounds: rounds are taken together
        coordinator.step()
    if rank == 0:
        infos = coordinator.local_entries.entry_infos()
        parents = {i.key: i.parent for i in infos}
        changed = sum(i.nbytes for i in infos if coordinator.ring.get_node(root_of(i.key, parents)) == 1)
        sent = coordinator.counters["migrated_out_bytes"]
        result["join"] = {"held_bytes": held, "sent_bytes": sent, "sent_fraction": sent / held, "ideal_fraction": 0.5,
                          "bytes_whose_owner_changed": changed, "steps": coordinator.counters["migration_steps"],
                          "largest_step_bytes": coordinator.counters["largest_migration_step_bytes"],
                          "step_bound_bytes": bound}
    # new prompts after the join: each lands on its owner, so rank 1 now holds chains nobody else has
    for start in range(0, len(mine_after), 8):
        coordinator.generate(mine_after[start : start + 8])
    for _ in range(SETTLE_ROUNDS):  # directories and replicas catch up, so "only rank 1 holds it" is current
        coordinator.step()
    sent_before_leave = coordinator.counters["migrated_out_bytes"]
    steps_before_leave = coordinator.counters["migration_steps"]
    dist.barrier()  # rank 1 drains now
    if rank == 0:
        received = coordinator.counters["migrated_in_bytes"]
        while coordinator.nodes[1].state.value != "offline":
            coordinator.step()
        result["leave"] = {"payload_bytes_received": coordinator.counters["migrated_in_bytes"] - received}
    else:
        infos = coordinator.local_entries.entry_infos()
        held = sum(i.nbytes for i in infos)
        sole = sum(i.nbytes for i in infos if coordinator.directory.holders(i.key) == {1})
        left = coordinator.drain(timeout_s=120.0)
        sent = coordinator.counters["migrated_out_bytes"] - sent_before_leave
        result["leave"] = {"held_bytes": held, "sole_copy_bytes": sole, "sent_bytes": sent,
                           "sent_fraction_of_sole_copies": sent / max(sole, 1), "entries_left": left,
                           "steps": coordinator.counters["migration_steps"] - steps_before_leave,
                           "largest_step_bytes": coordinator.counters["largest_migration_step_bytes"],
                           "step_bound_bytes": bound}
    coordinator.close()
    hook.detach()
    merged: dict = {}
    for part in gather(result):
        for phase, figures in part.items():
            merged.setdefault(phase, {}).update(figures)
    return merged


# ---------------------------------------------------------------------- part 3
def simulate_membership(nodes: int = 8, chains: int = 4000, chain_length: int = 3) -> dict:
    """Planner-only: bytes moved when a 9th process joins 8, and when one of 9 leaves, vs 1/N."""
    from hf_kvcache_plugin.distributed import ConsistentHashRing, EntryDirectory, EntryInfo, plan_migration

    entries: dict[int, list[EntryInfo]] = {}
    ring = ConsistentHashRing(128, dict.fromkeys(range(nodes), 1.0))
    directory = EntryDirectory()
    total = 0
    for c in range(chains):
        parent = None
        infos = []
        for depth in range(chain_length):
            key = hashlib.blake2b(f"{c}/{depth}".encode(), digest_size=32).digest()
            infos.append(EntryInfo(key, parent, 15360, depth))
            parent = key
        owner = ring.get_node(infos[0].key)
        entries.setdefault(owner, []).extend(infos)
        for info in infos:
            directory.add(info.key, info.nbytes, [owner])
            total += info.nbytes

    def moved(ring_after, keep_copies=True, only=None):
        sent = 0
        for node_id, infos in entries.items():
            if only is not None and node_id != only:
                continue
            plan = plan_migration(node_id, infos, ring_after, directory, keep_copies=keep_copies)
            sent += plan.nbytes
        return sent

    joined = ring.copy()
    joined.add_node(nodes)
    join_sent = moved(joined)
    left = ring.copy()
    left.remove_node(0)
    leave_sent = moved(left, keep_copies=False, only=0)
    return {
        "nodes_before": nodes, "chains": chains, "total_bytes": total,
        "join": {"sent_fraction": join_sent / total, "ideal_fraction": 1 / (nodes + 1)},
        "leave": {"sent_fraction": leave_sent / total, "ideal_fraction": 1 / nodes},
    }


def main() -> None:
    args = parse_args()
    if "WORLD_SIZE" not in os.environ:
        sys.exit(relaunch_under_torchrun(args))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank = dist.get_rank()
    rounds = args.rounds or (5 if args.quick else 8)
    models = [args.model] if args.quick else [args.model, "random-h512-l8"]
    results: dict = {"processes": dist.get_world_size(), "rounds": rounds, "batch": args.batch,
                     "prefixes": args.prefixes, "prefix_chunks": args.prefix_chunks, "chunk": CHUNK,
                     "new_tokens": args.new_tokens, "device": "cpu", "serving": {}}
    for model_name in models:
        model, group_size = make_model(model_name)
        batches = workload(rank, args.prefixes, args.prefix_chunks, rounds, args.batch)
        # bytes of one stored prefix: measured, so that `tight` holds about half of them whatever the model
        probe = serve_probe(model, group_size, batches[0][0])
        budgets = {"ample": 2 * probe * args.prefixes, "tight": probe * args.prefixes / 2}
        if args.quick:
            budgets = {"tight": budgets["tight"]}
        label = Path(model_name).name
        for budget_name, budget_bytes in budgets.items():
            figures = serve_side_by_side(model, group_size, batches, budget_bytes / 2**20, args.new_tokens,
                                         namespace=f"serve-{label}-{budget_name}")
            figures["store_mb"] = budget_bytes / 2**20
            results["serving"][f"{label}/{budget_name}"] = figures
        if model_name == args.model:
            results["join_leave"] = join_and_leave(model, group_size, 48 if args.quick else 96, f"join-{label}")
    if rank == 0:
        results["simulation"] = simulate_membership()
        print_table(results)
        out = Path(args.out) if args.out else RESULTS / ("distributed_quick.json" if args.quick else "distributed.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
    dist.barrier()
    dist.destroy_process_group()


def serve_probe(model, group_size: int, prompt: list[int]) -> int:
    """Bytes the store holds after one prompt: a prefix's chunks plus the suffix's full chunks."""
    from hf_kvcache_plugin import CacheConfig, PrefixStore, attach_prefix_cache
    from hf_kvcache_plugin.distributed import generate_new_tokens

    cache_config = CacheConfig(quant_type="int8", group_size=group_size, residual_length=4 * group_size)
    hook = attach_prefix_cache(model, PrefixStore(max_size_mb=256, chunk_size=CHUNK), cache_config)
    generate_new_tokens(model, [prompt], 0, max_new_tokens=1)
    used = hook.store.used_bytes
    hook.detach()
    return used


def print_table(results: dict) -> None:
    print(f"\n{'workload':32} {'mode':12} {'hit rate':>8} {'seconds':>8} {'sent away':>9}")
    for name, figures in results["serving"].items():
        for mode in ("independent", "coordinated"):
            f = figures[mode]
            sent = sum(r.get("sent_to_others", 0) for r in f["per_rank"])
            print(f"{name:32} {mode:12} {f['token_hit_rate']:8.3f} {f['seconds']:8.2f} {sent:9d}")
    jl = results["join_leave"]
    print(f"\njoin (1 -> 2 processes): sent {jl['join']['sent_fraction']:.3f} of held bytes (ideal 1/N = 0.5; "
          f"exactly the chains whose owner changed: {jl['join']['bytes_whose_owner_changed']} bytes)")
    print(f"join: {jl['join']['steps']} steps, largest {jl['join']['largest_step_bytes']} bytes "
          f"(bound {jl['join']['step_bound_bytes']})")
    print(f"leave (2 -> 1): sent {jl['leave']['sent_bytes']} bytes = {jl['leave']['sent_fraction_of_sole_copies']:.3f} "
          f"of the {jl['leave']['sole_copy_bytes']} bytes only the leaving process held (ideal 1.0; it held "
          f"{jl['leave']['held_bytes']}), {jl['leave']['steps']} steps, {jl['leave']['entries_left']} entries left")
    sim = results["simulation"]
    print(f"planner, {sim['nodes_before']} -> {sim['nodes_before'] + 1} processes: sent "
          f"{sim['join']['sent_fraction']:.3f} of all bytes (ideal {sim['join']['ideal_fraction']:.3f}); "
          f"one of {sim['nodes_before']} leaves: {sim['leave']['sent_fraction']:.3f} "
          f"(ideal {sim['leave']['ideal_fraction']:.3f})")


if __name__ == "__main__":
    main()
