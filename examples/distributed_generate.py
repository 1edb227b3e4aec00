"""Data-parallel generation where the processes share one prefix cache.

    # CPU, 2 processes on this machine (gloo)
    torchrun --nproc_per_node 2 examples/distributed_generate.py --config configs/distributed.yaml
    # GPUs, one process per GPU
    accelerate launch --multi_gpu --num_processes 2 examples/distributed_generate.py --config configs/distributed.yaml
    # one process: the coordinator is a no-op, everything is served locally
    python examples/distributed_generate.py

Each process gets its share of the requests (``split_between_processes``) and
hands its batches to ``coordinator.generate``: a request whose prompt begins
like one a peer has stored is served by that peer and its tokens come back to
the process that received it, in order. Each process prints its requests'
stories and its figures: where its prompts were served, the hit rate of the
prompts it served, breaker states.

``accelerate launch --cpu`` starts a single process; for several CPU
processes use torchrun (accelerate's multi-CPU launch goes through MPI).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _model import DEFAULT_MODEL, MODEL_HELP
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kvcache_plugin import DistributedConfig, attach_coordinator, attach_prefix_cache, load_config

SYSTEM_PROMPTS = [
    "You are a storyteller for small children. Your stories are short and kind. Every story has a child and an "
    "animal who become friends. Use simple words and end with a happy line. Here is the request: ",
    "Write a story for a bedtime book. The story happens in a small town by the sea, where a boat, a dog and a "
    "girl named Mia have a quiet day. Keep it gentle. Here is the request: ",
    "Tell a story about a garden where vegetables can talk. The tomato is proud, the carrot is shy and the "
    "pumpkin is wise. Keep every sentence short. Here is the request: ",
]
REQUESTS = [
    "A lost ball.", "A rainy day.", "A new friend.", "A big cake.", "A red kite.", "A sleepy cat.",
    "A shiny shell.", "A funny hat.", "A little boat.", "A warm blanket.", "A tall tree.", "A secret door.",
]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help=MODEL_HELP)
parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "distributed.yaml"))
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--max-new-tokens", type=int, default=30)
args = parser.parse_args()
config = load_config(args.config)  # unknown keys or bad values raise a ValueError naming them
model_name = args.model or config.model or str(DEFAULT_MODEL)

# under torchrun: the launch's rank and world size. Without `cpu=True` a CPU-only launch stays single-process
# in accelerate's view; with it, accelerate initialises gloo.
accelerator = Accelerator(cpu=not torch.cuda.is_available())
tokenizer = AutoTokenizer.from_pretrained(model_name)
model = AutoModelForCausalLM.from_pretrained(model_name).eval().to(accelerator.device)
pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

hook = attach_prefix_cache(model, config=config)  # this process's store, from `prefix_store:`
coordinator = attach_coordinator(
    hook,
    config.distributed or DistributedConfig(),
    pad_token_id=pad_id,
    generate_kwargs=dict(max_new_tokens=args.max_new_tokens, do_sample=False),
)
prompts = [system + request for request in REQUESTS for system in SYSTEM_PROMPTS]
rank = accelerator.process_index
with coordinator, accelerator.split_between_processes(prompts) as mine:
    for start in range(0, len(mine), args.batch_size):
        batch = mine[start : start + args.batch_size]
        token_lists = [tokenizer(text)["input_ids"] for text in batch]
        outputs = coordinator.generate(token_lists)
        for i, (text, new_tokens) in enumerate(zip(batch, outputs)):
            server = coordinator.last_routes.get((rank, i))
            where = "here" if server is None or server.server == rank else f"on rank {server.server}"
            story = tokenizer.decode(new_tokens, skip_special_tokens=True).replace("\n", " ")
            print(f"[rank {rank}] {text[-16:]!r} (served {where}): {story[:70]}")
    stats = coordinator.stats()
    served = hook.stats()
print(
    f"[rank {rank}] served here: {served['requests']} prompts, token hit rate {served['token_hit_rate']:.2f}; "
    f"sent to others: {stats.get('sent_to_others', 0)}, served for others: {stats.get('served_for_others', 0)}, "
    f"local fallbacks: {stats.get('served_local_fallback', 0)}; breakers {stats.get('breakers', {})}; "
    f"store {hook.store.stats()['entries']} entries"
)
hook.detach()
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
