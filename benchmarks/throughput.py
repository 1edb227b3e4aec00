"""Quantize / dequantize throughput against the machine's copy bandwidth, ours and the peers' kernels.

One bf16 tensor of KV shape [1, 8 heads, N tokens, 128] (64 MiB by default) is
quantized and dequantized the way each cache does it: ours per block of G
tokens (``BlockCodec``: keys per channel, values per token) and dequantized
into a preallocated buffer as in decode; quanto (``MaxOptimizer`` +
``quantize_weight``) and HQQ (``HQQQuantizer``) as transformers' ``QuantizedCache``
calls them. GB/s = bytes of the bf16 tensor / second, also for the two copy
yardsticks: ``clone()`` (allocates, so it pays first-touch page faults) and
``copy_()`` into an existing buffer. Seconds are this thread's CPU time
(``time.thread_time``; single-threaded torch), with wall time kept alongside.

    python benchmarks/throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import Recorder, format_table, set_threads  # noqa: E402

from hf_kvcache_plugin.blocks import BlockCodec, _dequantize_into  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median (thread CPU s, wall s) over ``repeats`` calls after one warm-up call."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def peer_kernels(bits: int, group_size: int):
    """(quantize, dequantize) callables of quanto / HQQ as ``QuantizedCache`` uses them (axis 0)."""
    out = {}
    if bits in (2, 4):
        from optimum.quanto import MaxOptimizer, qint2, qint4, quantize_weight

        qtype, optimizer = (qint4 if bits == 4 else qint2), MaxOptimizer()

        def quanto_quantize(x):
            scale, shift = optimizer(x, qtype, 0, group_size)
            return quantize_weight(x, qtype, 0, scale, shift, group_size)

        out["quanto"] = (quanto_quantize, lambda q: q.dequantize())
    from hqq.core.quantize import Quantizer as HQQQuantizer

    def hqq_quantize(x):
        q, meta = HQQQuantizer.quantize(x, axis=0, device=x.device, compute_dtype=x.dtype, nbits=bits,
                                        group_size=group_size)
        meta["compute_dtype"] = x.dtype
        HQQQuantizer.cuda(q, meta=meta, device=x.device)
        return q, meta

    out["hqq"] = (hqq_quantize, lambda qm: HQQQuantizer.dequantize(qm[0], qm[1]))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tokens", type=int, help="tokens of the [1, 8, N, 128] bf16 tensor (default 32768; quick 8192)")
    p.add_argument("--repeats", type=int, help="timed calls per kernel (default 5; quick 3)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args(argv)
    set_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    g = args.group_size
    # HQQ's quantize (an iterative optimiser) takes ~25 s per call at 32k tokens on one core
    tokens = args.tokens or (8192 if args.quick else 32768)

    x = torch.randn(1, 8, tokens, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    nbytes = x.numel() * x.element_size()
    settings = {"shape": list(x.shape), "dtype": "bfloat16", "tensor_mib": nbytes / 2**20, "repeats": repeats,
                "group_size": g, "clock": "thread CPU time (wall kept alongside)"}
    rec = Recorder("throughput", settings, args.out)

    def add(kernel: str, op: str, cpu: float, wall: float, **extra):
        return rec.add(kernel=kernel, op=op, gb_s=nbytes / cpu / 1e9, gb_s_wall=nbytes / wall / 1e9,
                       ms=cpu * 1e3, **extra)

    buffer = torch.empty_like(x)
    copy_clone = add("copy", "clone()", *timed(lambda: x.clone(), repeats))
    copy_into = add("copy", "copy_()", *timed(lambda: buffer.copy_(x), repeats))
    for bits in (8, 4, 2):
        for axis in ("channel", "token"):
            codec = BlockCodec(bits, g, axis, scale_dtype=torch.float16)
            add(f"ours-int{bits}-{axis}", "quantize", *timed(lambda: codec.encode(x), repeats), bits=bits)
            q = codec.encode(x)
            add(f"ours-int{bits}-{axis}", "dequantize", *timed(lambda: _dequantize_into(q, buffer), repeats),
                bits=bits)
        if not args.no_peers:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for family, (quantize_fn, dequantize_fn) in peer_kernels(bits, g).items():
                    add(f"{family}-int{bits}", "quantize", *timed(lambda: quantize_fn(x), repeats), bits=bits)
                    qp = quantize_fn(x)
                    add(f"{family}-int{bits}", "dequantize", *timed(lambda: dequantize_fn(qp), repeats), bits=bits)
    for r in rec.rows:
        r["vs_copy_into"] = r["gb_s"] / copy_into["gb_s"]
        r["vs_clone"] = r["gb_s"] / copy_clone["gb_s"]
    print(format_table(rec.rows, ["kernel", "op", "gb_s", "gb_s_wall", "ms", "vs_copy_into", "vs_clone"]))
    rec.write()
    return {"rows": rec.rows}


if __name__ == "__main__":
    main()
