"""Compression ratio (DynamicCache bytes / our bytes, every byte counted) per quant type,
context length and model dtype, from `QuantizedKVCache.get_stats()`.

Shapes: a realistic head (head_dim 128, 8 KV heads; the ratio does not depend on the
number of layers) and the shared stories260K model (head_dim 8, 4 KV heads). K/V are
random normal tensors: byte counts do not depend on their values.

    python benchmarks/compression_ratios.py            # 1k and 4k tokens, bf16 and fp32
    python benchmarks/compression_ratios.py --tokens 512 8192
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_kvcache_plugin import create_quantized_kv_cache

SHAPES = {"head_dim128_kv8": (8, 128), "stories260K_head_dim8_kv4": (4, 8)}
QUANT_TYPES = ("int8", "int4", "int2", "mixed")


def measure(quant_type: str, heads: int, head_dim: int, tokens: int, dtype: torch.dtype, **options) -> dict:
    cache = create_quantized_kv_cache(quant_type, num_layers=1, num_heads=heads, head_dim=head_dim, **options)
    k = torch.randn(1, heads, tokens, head_dim, dtype=dtype)
    cache.update(k, torch.randn_like(k), 0)
    stats = cache.get_stats()
    stats["bits_per_element"] = 8 * stats["total_bytes"] / (2 * heads * tokens * head_dim)
    stats["group_size"] = cache.cache_config.group_size
    stats["residual_length"] = cache.cache_config.residual_length
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compression_ratios.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'shape':28} {'dtype':9} {'tokens':>6} {'type':6} {'group':>5} {'bits/elem':>9} {'ratio':>7}")
    for shape, (heads, head_dim) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            for tokens in args.tokens:
                # the small model has only 512 positions; its row shows the layout's ratio regardless
                for quant_type in QUANT_TYPES:
                    s = measure(quant_type, heads, head_dim, tokens, dtype)
                    rows.append({"shape": shape, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
                                 "quant_type": quant_type, **s})
                    print(f"{shape:28} {rows[-1]['dtype']:9} {tokens:>6} {quant_type:6} {s['group_size']:>5} "
                          f"{s['bits_per_element']:>9.3f} {s['compression_ratio']:>7.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": "defaults: residual_length 128, scale_dtype float16, "
                                          "mixed_int8_tokens 512, group_size min(64, head_dim)", "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
