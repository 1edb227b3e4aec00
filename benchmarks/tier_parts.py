"""What holding a tier in parts costs a decode step: fused attention over one layer's history held in parts of
``PART_TOKENS`` (the default, 512) against the same history held as one tensor per tier, side by side.

Parts bound the copy a flush makes (one part instead of the stream's whole history, see blocks.py); the C++
kernel reads all parts of a tier in one call, so the only cost is per-part bookkeeping. One layer of
realistic shape (8 KV heads x head_dim 128, batch 1, one query row per KV head), filled with random K/V,
INT4 and INT8 at group 64; the two layouts are timed interleaved, medians of --repeats x --steps calls of
``attention_from_layer`` on the machine's default threads. Also reported: the largest tensor a flush
concatenates (bytes), from a decode of --flush-steps tokens after the prefill.

    python benchmarks/tier_parts.py
    python benchmarks/tier_parts.py --contexts 2048 --repeats 1 --steps 5   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_kvcache_plugin import block_tensors, blocks, create_quantized_kv_cache
from hf_kvcache_plugin.attention.reference import attention_from_layer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import RESULTS_DIR, machine  # noqa: E402

HEADS, HEAD_DIM, GROUP = 8, 128, 64


def make_cache(quant_type: str, context: int, part_tokens: int, dtype: torch.dtype, flush_steps: int):
    """A one-layer cache holding ``context`` random tokens, then ``flush_steps`` decode tokens; returns it and the
    largest number of bytes one block concatenation produced during the decode."""
    blocks.PART_TOKENS = part_tokens
    cache = create_quantized_kv_cache(quant_type, num_layers=1, num_heads=HEADS, head_dim=HEAD_DIM,
                                      group_size=GROUP, residual_length=128)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, HEADS, context + flush_steps, HEAD_DIM, generator=g).to(dtype)
    v = torch.randn(1, HEADS, context + flush_steps, HEAD_DIM, generator=g).to(dtype)
    cache.update(k[:, :, :context], v[:, :, :context], 0)
    largest = [0]
    real_cat = block_tensors.cat_blocks

    def measuring_cat(parts):
        out = real_cat(parts)
        largest[0] = max(largest[0], out.nbytes)
        return out

    block_tensors.cat_blocks = measuring_cat
    try:
        for t in range(context, context + flush_steps):
            cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], 0)
    finally:
        block_tensors.cat_blocks = real_cat
    return cache, largest[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--quant-types", nargs="+", default=["int4", "int8"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--flush-steps", type=int, default=130, help="decode tokens after the prefill (>= 2 flushes)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=str(RESULTS_DIR / "tier_parts.json"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    default_part = blocks.PART_TOKENS
    layouts = {f"parts of {default_part}": default_part, "one tensor per tier": 10**12}
    rows = []
    for quant_type in args.quant_types:
        for context in args.contexts:
            caches = {name: make_cache(quant_type, context, part, dtype, args.flush_steps)
                      for name, part in layouts.items()}
            blocks.PART_TOKENS = default_part
            query = torch.randn(1, HEADS, 1, HEAD_DIM).to(dtype)
            times: dict[str, list[float]] = {name: [] for name in layouts}
            with torch.inference_mode():
                for name, (cache, _) in caches.items():  # warm-up
                    attention_from_layer(query, cache.layers[0], None, HEAD_DIM ** -0.5, cpu_kernel=True)
                for _ in range(args.repeats):
                    for name, (cache, _) in caches.items():
                        start = time.perf_counter()
                        for _ in range(args.steps):
                            attention_from_layer(query, cache.layers[0], None, HEAD_DIM ** -0.5, cpu_kernel=True)
                        times[name].append((time.perf_counter() - start) / args.steps)
            base = statistics.median(times["one tensor per tier"])
            for name, (cache, largest) in caches.items():
                layer = cache.layers[0]
                rows.append({
                    "quant_type": quant_type, "context": context, "layout": name,
                    "parts_per_stream": len(layer.quantized_keys.tiers),
                    "attention_ms": 1e3 * statistics.median(times[name]),
                    "vs_one_tensor": base / statistics.median(times[name]),
                    "largest_flush_copy_bytes": largest, "stored_bytes": cache.get_stats()["total_bytes"],
                })
    print(f"fused attention, one layer, 8 KV heads x 128, batch 1, {args.dtype}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} x {args.steps}")
    print(f"{'type':5} {'context':>7} {'layout':22} {'parts':>5} {'ms':>7} {'speed vs one':>12} "
          f"{'largest flush copy':>18} {'stored':>10}")
    for r in rows:
        print(f"{r['quant_type']:5} {r['context']:>7} {r['layout']:22} {r['parts_per_stream']:>5} "
              f"{r['attention_ms']:>7.3f} {r['vs_one_tensor']:>11.2f}x {r['largest_flush_copy_bytes'] / 2**10:>14.1f} KiB "
              f"{r['stored_bytes'] / 2**20:>6.2f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine(), "settings": vars(args), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
