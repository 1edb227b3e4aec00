"""Many requests, one long system prompt: the prefix store prefills it once, later requests reuse it.

    python examples/shared_system_prompt.py                      # the embedded stories260K
    python examples/shared_system_prompt.py --model <id or path> --config configs/prefix_reuse.yaml

Prints each request's hit tokens and time to first token, then the hook's and
the store's figures. The YAML's `cache:` group_size must suit the model's
head_dim (the shipped file uses 8, for stories260K).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _model import DEFAULT_MODEL, MODEL_HELP
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_kvcache_plugin import attach_prefix_cache, enable_quantized_attention, load_config

SYSTEM_PROMPT = (
    "You are a storyteller for small children. Your stories are short and kind. Every story has a child, an "
    "animal and a lesson about sharing, helping or being brave. Use simple words. Start with once upon a time. "
    "The child and the animal meet in a garden, a park or a forest. They find a problem, they try to fix it, "
    "and at the end they are happy and they are friends. Do not use scary words. Say what the child feels. "
    "Tell the story in a few sentences and end with a happy line. Here is the request: "
)
REQUESTS = [
    "A girl named Lily and a small dog who lost his ball.",
    "A boy named Tom and a bird who could not fly.",
    "Two friends, Sue and Ben, and a cat in a tree.",
    "A little fish who wanted to see the sun.",
    "Max and a big bear who was hungry.",
    "A girl who shared her cake with a mouse.",
]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help=MODEL_HELP)
parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "prefix_reuse.yaml"))
parser.add_argument("--max-new-tokens", type=int, default=60)
args = parser.parse_args()
config = load_config(args.config)  # unknown keys or bad values raise a ValueError naming them
model_name = args.model or config.model or str(DEFAULT_MODEL)

tokenizer = AutoTokenizer.from_pretrained(model_name)
model = AutoModelForCausalLM.from_pretrained(model_name).eval()
if config.cache.attention == "fused":
    # attention reads the packed blocks (the reused prefix included) instead of dequantizing them
    enable_quantized_attention(model)

# The store, the sizer (the YAML's `sizer:` section) and the cache settings all come from the config.
hook = attach_prefix_cache(model, config=config)
try:
    for i, request in enumerate(REQUESTS):
        inputs = tokenizer(SYSTEM_PROMPT + request, return_tensors="pt")
        torch.manual_seed(i)
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=True, top_k=40)
        record = hook.records[-1]
        story = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"[{i}] prompt {record.prompt_tokens} tokens, reused {record.hit_tokens}, "
              f"time to first token {record.ttft_ms:.1f} ms\n    {story.strip()[:160]}")
    stats = hook.stats()
    print(f"\nrequests {stats['requests']}, request hit rate {stats['request_hit_rate']:.2f}, "
          f"token hit rate {stats['token_hit_rate']:.2f}")
    print(f"store: {stats['store']['entries']} chunks, {stats['store']['used_bytes']} bytes "
          f"of {stats['store']['max_bytes']}")
    if hook.sizer is not None:
        print(f"sizer: budget {hook.sizer.current_size_mb:.0f} MiB, {hook.sizer.get_stats()['last_reason']}")
finally:
    hook.detach()  # model.generate is the original again; the sizer thread is stopped
