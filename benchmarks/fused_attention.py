"""Decode speed and peak memory of attention read straight from the quantized cache
(`kvquant_sdpa`), side by side with DynamicCache, the dequantize-then-SDPA path and
transformers' QuantizedCache (quanto), in one run.

Model: a randomly initialised Llama of realistic head shape (head_dim 128, 8 KV heads,
8 query heads, hidden 1024, 2 layers), batch 1. Each cache is filled with the same
random K/V for the context length, then N single-token decode steps run through the
model. Speed: configurations interleaved, several repeats, median step time.
Peak memory: each configuration in a fresh subprocess (glibc's mmap threshold fixed at
128 KiB so freed blocks leave RSS at once); after --memory-steps warm-up steps, RSS sampled
every ~0.5 ms by a psutil thread during --memory-steps more decode steps (the default, 80,
includes a flush of the 64-token blocks); reported as the peak RSS above the RSS before
them (the transient the steps need, and the growth of the cache) next to the cache's
stored bytes at the end.

    python benchmarks/fused_attention.py --quick
    python benchmarks/fused_attention.py --contexts 2048 8192 --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import psutil
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, QuantizedCache

from hf_kvcache_plugin import QuantizedKVCache, register_quantized_attention
from hf_kvcache_plugin._compat import GENERATE_CACHE_KWARG

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import machine  # noqa: E402

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).parent / "results"

# name -> (attention implementation, cache factory)
CONFIGS = {
    "dynamic": ("sdpa", lambda cfg: DynamicCache(config=cfg)),
    "quanto_int4": ("sdpa", lambda cfg: QuantizedCache("quanto", cfg, nbits=4, q_group_size=64, residual_length=128)),
    "ours_int4_dequantize": ("sdpa", lambda cfg: QuantizedKVCache(cfg, "int4", group_size=64, attention="dequantize")),
    "ours_int4_fused": ("kvquant_sdpa", lambda cfg: QuantizedKVCache(cfg, "int4", group_size=64)),
    "ours_int8_fused": ("kvquant_sdpa", lambda cfg: QuantizedKVCache(cfg, "int8", group_size=64)),
}


def make_model(dtype: torch.dtype, max_positions: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=1024, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=8, head_dim=128, vocab_size=1000, max_position_embeddings=max_positions + 1024,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def filled_cache(name: str, model, context: int, dtype: torch.dtype):
    _, factory = CONFIGS[name]
    cache = factory(model.config)
    g = torch.Generator().manual_seed(1)
    for layer in range(model.config.num_hidden_layers):
        k = torch.randn(1, 8, context, 128, generator=g).to(dtype)
        v = torch.randn(1, 8, context, 128, generator=g).to(dtype)
        cache.update(k, v, layer)
    return cache


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds; quanto's tensor subclasses report their logical dtype,
    so their inner tensors (packed data, scale, shift) are counted instead."""
    if hasattr(t, "__tensor_flatten__"):
        inner, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in inner)
    return t.numel() * t.element_size()


def cache_bytes(cache) -> int:
    if isinstance(cache, QuantizedKVCache):
        return cache.get_stats()["total_bytes"]
    return sum(
        tensor_bytes(obj)
        for layer in cache.layers
        for obj in (getattr(layer, n, None) for n in ("keys", "values", "_quantized_keys", "_quantized_values"))
        if isinstance(obj, torch.Tensor)
    )


@torch.inference_mode()
def decode_steps(model, cache, steps: int) -> list[float]:
    ids = torch.tensor([[5]])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True, **{GENERATE_CACHE_KWARG: cache})
        times.append(time.perf_counter() - start)
    return times


def measure_speed(args, dtype) -> list[dict]:
    register_quantized_attention()
    model = make_model(dtype, max(args.contexts))
    rows = []
    for context in args.contexts:
        samples: dict[str, list[float]] = {name: [] for name in args.configs}
        for _ in range(args.repeats):
            for name in args.configs:  # interleaved: drift on a shared machine hits every config alike
                model.set_attn_implementation(CONFIGS[name][0])
                cache = filled_cache(name, model, context, dtype)
                decode_steps(model, cache, 2)  # warm-up
                samples[name].append(statistics.median(decode_steps(model, cache, args.steps)))
                del cache
                gc.collect()
        base = statistics.median(samples["dynamic"]) if "dynamic" in samples else None
        for name, values in samples.items():
            step = statistics.median(values)
            rows.append({"context": context, "config": name, "step_ms": step * 1e3, "tokens_per_s": 1 / step,
                         "vs_dynamic": (base / step) if base else None})
        if "ours_int4_dequantize" in samples:
            unfused = statistics.median(samples["ours_int4_dequantize"])
            for row in rows:
                if row["context"] == context and row["config"] == "ours_int4_fused":
                    row["vs_dequantize"] = unfused / (row["step_ms"] / 1e3)
    return rows


def memory_probe(name: str, context: int, dtype_name: str, steps: int) -> dict:
    """Run in a fresh process: RSS before decoding, peak RSS while decoding, stored bytes."""
    dtype = getattr(torch, dtype_name)
    register_quantized_attention()
    model = make_model(dtype, context)
    model.set_attn_implementation(CONFIGS[name][0])
    cache = filled_cache(name, model, context, dtype)
    # warm up through a flush (the allocator's and the kernels' one-time growth is not the cache's), then
    # measure over enough steps to include another: a flush quantizes a block and grows the history
    decode_steps(model, cache, steps)
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = before
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    decode_steps(model, cache, steps)
    stop.set()
    sampler.join()
    stored = cache_bytes(cache)
    return {"config": name, "context": context, "stored_bytes": stored, "decode_peak_above_start_bytes": peak - before,
            "peak_over_stored": (stored + peak - before) / stored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small contexts and few steps (smoke run)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--memory-steps", type=int, default=80, help="decode steps of the peak-memory probe")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="default: the machine's")
    parser.add_argument("--out", default=str(RESULTS / "fused_attention.json"), help="JSON file to write")
    parser.add_argument("--memory-probe", nargs=2, metavar=("CONFIG", "CONTEXT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe[0], int(args.memory_probe[1]), args.dtype, args.memory_steps)))
        return
    if args.quick:
        args.contexts, args.repeats, args.steps, args.memory_steps = [512], 1, 3, 8
    dtype = getattr(torch, args.dtype)

    speed = measure_speed(args, dtype)
    memory = []
    for context in args.contexts:
        for name in args.configs:
            cmd = [sys.executable, __file__, "--memory-probe", name, str(context), "--dtype", args.dtype,
                   "--memory-steps", str(args.memory_steps), "--threads", str(args.threads)]
            # A fixed glibc mmap threshold hands every large block back to the OS when freed, so RSS
            # follows the live bytes (by default glibc keeps freed blocks and RSS hides transients).
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            memory.append(json.loads(out.strip().splitlines()[-1]))

    print(f"\ndecode, batch 1, {args.dtype}, {args.threads} thread(s), median of {args.repeats} x {args.steps} steps")
    print(f"{'context':>7} {'config':22} {'ms/step':>8} {'tok/s':>7} {'vs dynamic':>10} {'vs dequant':>10} "
          f"{'stored MiB':>10} {'peak above MiB':>14} {'peak/stored':>11}")
    for row in speed:
        mem = next(m for m in memory if m["config"] == row["config"] and m["context"] == row["context"])
        vs_d = f"{row['vs_dynamic']:.2f}x" if row.get("vs_dynamic") else "-"
        vs_q = f"{row['vs_dequantize']:.2f}x" if row.get("vs_dequantize") else "-"
        print(f"{row['context']:>7} {row['config']:22} {row['step_ms']:>8.2f} {row['tokens_per_s']:>7.1f} {vs_d:>10} "
              f"{vs_q:>10} {mem['stored_bytes'] / 2**20:>10.2f} {mem['decode_peak_above_start_bytes'] / 2**20:>14.2f} "
              f"{mem['peak_over_stored']:>11.3f}")
    result = {"machine": machine(), "settings": vars(args) | {"out": None}, "speed": speed, "memory": memory}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
