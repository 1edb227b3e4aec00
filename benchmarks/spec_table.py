"""The specification's performance table, measured: ours next to each claim.

Shape of the specification: 12 layers, 12 KV heads, head_dim 64. A "token" is
its keys and values in every layer (12 x 12 x 64 x 2 = 18,432 elements);
quantize/dequantize run the cache's own codecs (keys per channel, values per
token, group 64, fp16 scales and zeros) over ``--tokens`` tokens at a time, bf16
K/V, default threads. Memory overhead is counted from the stored tensors:
scale and zero bytes per element. The ring, breaker and health check are the
package's own (``ConsistentHash``, ``CircuitBreaker``, ``HealthChecker``);
their memory is what ``tracemalloc`` sees allocated while building them.

    python benchmarks/spec_table.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import torch

from hf_kvcache_plugin.blocks import BlockCodec
from hf_kvcache_plugin.distributed.hash_ring import ConsistentHashRing
from hf_kvcache_plugin.quantization import dequantize_into
from hf_kvcache_plugin.resilience.breakers import CircuitBreaker
from hf_kvcache_plugin.resilience.health import CheckResult, HealthChecker, HealthStatus

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import Recorder, format_table, machine  # noqa: E402

LAYERS, HEADS, HEAD_DIM, GROUP = 12, 12, 64, 64


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def allocated_bytes(build) -> int:
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    kept = build()  # noqa: F841 (kept alive while the snapshot is taken)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))


def per_token(seconds: float, tokens: int) -> str:
    """Per token of the whole model, and per (layer, head) K+V pair of head_dim vectors (128 elements)."""
    ns = seconds / tokens * 1e9
    return f"{ns:.0f} ns/token ({ns / (LAYERS * HEADS):.0f} ns per layer and head)"


def codec_rows(bits: int, tokens: int, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(bits)
    shape = (1, HEADS, tokens, HEAD_DIM)
    keys = [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(LAYERS)]
    values = [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(LAYERS)]
    codecs = (BlockCodec(bits, GROUP, "channel", scale_dtype=torch.float16),
              BlockCodec(bits, GROUP, "token", scale_dtype=torch.float16))
    encoded: list = []

    def quantize_all():
        encoded.clear()
        for k, v in zip(keys, values):
            encoded.append((codecs[0].encode(k), codecs[1].encode(v)))

    out = torch.empty(1, HEADS, tokens // GROUP, GROUP, HEAD_DIM, dtype=torch.bfloat16)

    def dequantize_all():
        for qk, qv in encoded:
            dequantize_into(qk, out)
            dequantize_into(qv, out)

    q_s = timed(quantize_all, repeats)
    d_s = timed(dequantize_all, repeats)
    elements = 2 * LAYERS * HEADS * tokens * HEAD_DIM
    code_bytes = elements * bits // 8
    meta_bytes = sum(q.nbytes for pair in encoded for q in pair) - code_bytes
    return [
        {"operation": f"INT{bits} quantize", "ours": per_token(q_s, tokens),
         "memory": f"{meta_bytes / elements:.4f} bytes/element (scale + zero)", "ns_per_token": q_s / tokens * 1e9,
         "meta_bytes_per_element": meta_bytes / elements},
        {"operation": f"INT{bits} dequantize", "ours": per_token(d_s, tokens), "memory": "0 (writes "
         "into the caller's buffer)", "ns_per_token": d_s / tokens * 1e9},
    ]


def ring_rows(repeats: int) -> list[dict]:
    rows = []
    for nodes in (4, 64, 1024):
        ring = ConsistentHashRing(virtual_nodes=100, nodes={f"node-{i}": 1.0 for i in range(nodes)})
        keys = [f"prefix-{i}" for i in range(1000)]
        seconds = timed(lambda: [ring.get_node(k) for k in keys], repeats) / len(keys)
        rows.append({"operation": f"consistent hash lookup, {nodes} nodes x 100 virtual", "ours":
                     f"{seconds * 1e9:.0f} ns", "ns": seconds * 1e9})
    per_100 = allocated_bytes(lambda: ConsistentHashRing(virtual_nodes=100, nodes={"a": 1.0}))
    rows[-1]["memory"] = f"{per_100} bytes per 100 virtual nodes"
    rows[-1]["bytes_per_100_virtual_nodes"] = per_100
    return rows


def breaker_row(repeats: int) -> dict:
    breaker = CircuitBreaker("bench")
    calls = 10_000
    seconds = timed(lambda: [breaker.call(int) for _ in range(calls)], repeats) / calls
    size = allocated_bytes(lambda: CircuitBreaker("bench-size"))
    return {"operation": "circuit breaker check (a call through a closed breaker)", "ours": f"{seconds * 1e9:.0f} ns",
            "memory": f"{size} bytes", "ns": seconds * 1e9, "bytes": size}


def health_row(repeats: int) -> dict:
    checker = HealthChecker()
    checker.register_check("cache", lambda: CheckResult(HealthStatus.HEALTHY, "ok"))
    seconds = timed(checker.get_overall_health, repeats)

    def build():
        c = HealthChecker()
        c.register_check("cache", lambda: CheckResult(HealthStatus.HEALTHY, "ok"))
        return c

    size = allocated_bytes(build)
    return {"operation": "health check (one registered check)", "ours": f"{seconds * 1e6:.1f} us",
            "memory": f"{size} bytes", "us": seconds * 1e6, "bytes": size}


CLAIMS = {
    "INT8 quantize": ("~200 ns/token", "~0.5 bytes/element (scale)"),
    "INT8 dequantize": ("~100 ns/token", "0"),
    "INT4 quantize": ("~350 ns/token", "~0.125 bytes/element (scale)"),
    "INT4 dequantize": ("~200 ns/token", "0"),
    "consistent hash": ("O(log n)", "~1KB per 100 virtual nodes"),
    "circuit breaker": ("~10 ns", "~100 bytes"),
    "health check": ("~1 ms", "~1KB"),
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="tokens quantized at a time (a multiple of 64)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args(argv)
    host = machine()
    print(f"CPU: {host['cpu_model']}; flags: {' '.join(host['cpu_flags'])}; torch threads: {host['torch_threads']}")
    rec = Recorder("spec_table", {"layers": LAYERS, "heads": HEADS, "head_dim": HEAD_DIM, "group_size": GROUP,
                                  "tokens": args.tokens, "repeats": args.repeats, "kv_dtype": "bfloat16"}, args.out)
    rows = codec_rows(8, args.tokens, args.repeats) + codec_rows(4, args.tokens, args.repeats)
    rows += ring_rows(args.repeats) + [breaker_row(args.repeats), health_row(args.repeats)]
    for row in rows:
        claim = next(v for k, v in CLAIMS.items() if row["operation"].startswith(k))
        row["spec_latency"], row["spec_memory"] = claim
        rec.add(**row)
    print(format_table(rows, ["operation", "spec_latency", "ours", "spec_memory", "memory"]))
    rec.write()
    return {"rows": rows}


if __name__ == "__main__":
    main()
