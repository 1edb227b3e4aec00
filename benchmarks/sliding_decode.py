"""Decode step time of sliding-window models: DynamicCache against QuantizedKVCache, dequantized and fused.

Two random bf16 models with Llama-3-8B's KV shape per layer (8 KV heads of
head_dim 128, as ``models.realistic_config``; a 4096-token vocabulary, the
head's cost is not the cache's): Mistral (every layer sliding)
and Gemma 3 (5 sliding layers : 1 full). A prompt longer than the window, then
decode steps fed their own greedy token. Variants, run in turns in one process
(round-robin repetitions, the median per step reported, so that the load of
other processes falls on all of them alike):

- ``dynamic``: ``DynamicCache`` (the sliding layers keep their window exact);
- ``int4-dequantize``: ``attention="dequantize"``, each step dequantizes each
  layer's window and runs SDPA over it;
- ``int4-fused``: the default ``attention="fused"``: ``kvquant_sdpa`` reads the
  packed blocks (the C++ CPU kernel where it builds), sliding layers included.

    python benchmarks/sliding_decode.py                 # window 1024, prompt 2048
    python benchmarks/sliding_decode.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.models import FORWARD_CACHE_KWARG  # noqa: E402
from benchmarks.records import Recorder, format_table  # noqa: E402
from hf_kvcache_plugin import QuantizedKVCache  # noqa: E402

VARIANTS = ("dynamic", "int4-dequantize", "int4-fused")
_SHAPE = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
              num_key_value_heads=8, head_dim=128, max_position_embeddings=65536)  # fmt: skip


def build(name: str, window: int):
    torch.manual_seed(0)
    if name == "mistral":
        model = MistralForCausalLM(MistralConfig(**_SHAPE, num_hidden_layers=4, sliding_window=window))
    else:
        layer_types = ["sliding_attention"] * 5 + ["full_attention"]
        config = Gemma3TextConfig(**_SHAPE, num_hidden_layers=6, sliding_window=window, layer_types=layer_types)
        model = Gemma3ForCausalLM(config)
    model = model.to(torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    return model


def make_cache(model, variant: str):
    if variant == "dynamic":
        return DynamicCache(config=model.config)
    return QuantizedKVCache(model.config, "int4", attention=variant.removeprefix("int4-"))


@torch.inference_mode()
def decode_ms(model, variant: str, prompt: torch.Tensor, steps: int) -> tuple[float, dict]:
    """Median ms of ``steps`` decode steps after the prefill and two warm-up steps; the cache's stats."""
    cache = make_cache(model, variant)
    kwargs = {FORWARD_CACHE_KWARG: cache, "use_cache": True, "logits_to_keep": 1}
    token = model(input_ids=prompt, **kwargs).logits[:, -1:].argmax(-1)
    for _ in range(2):
        token = model(input_ids=token, **kwargs).logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        token = model(input_ids=token, **kwargs).logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
    stats = cache.get_stats() if isinstance(cache, QuantizedKVCache) else {}
    return 1e3 * statistics.median(times), stats


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared machine a parallel operator waits for every busy core)")
    p.add_argument("--quick", action="store_true", help="window 256, prompt 512, 8 steps, 2 repeats")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.window, args.prompt, args.steps, args.repeats = 256, 512, 8, 2
    recorder = Recorder("sliding_decode", {"window": args.window, "prompt": args.prompt, "steps": args.steps,
                                           "repeats": args.repeats, "threads": args.threads, "dtype": "bfloat16",
                                           "quant_type": "int4"})
    prompt = torch.randint(3, 4096, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    for name in ("mistral", "gemma3"):
        model = build(name, args.window)
        runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
        stats: dict[str, dict] = {}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                ms, stats[variant] = decode_ms(model, variant, prompt, args.steps)
                runs[variant].append(ms)
        base = statistics.median(runs["dynamic"])
        for variant in VARIANTS:
            ms = statistics.median(runs[variant])
            recorder.add(model=name, variant=variant, ms_per_step=ms, vs_dynamic=ms / base,
                         compression_ratio=stats[variant].get("compression_ratio", 1.0), runs_ms=runs[variant])
        print(f"{name} done", flush=True)
    print(format_table(recorder.rows, ("model", "variant", "ms_per_step", "vs_dynamic", "compression_ratio")))
    cpu = recorder.machine_at_start
    print(f"{cpu['cpu_model']}, {cpu['logical_cpus']} logical CPUs, {cpu['torch_threads']} torch threads, "
          f"load average {cpu['load_average_1m']} (other processes share this machine: compare within a run)")
    recorder.write()
    return {"rows": recorder.rows}


if __name__ == "__main__":
    main()
