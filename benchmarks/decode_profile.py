"""Where a decode step's time goes: ``torch.profiler`` over forward-loop decode steps, per cache.

For DynamicCache, ours through the C++ CPU kernel, and ours through the
PyTorch reference path (the kernel switched off), it prints the operator
calls per step and the operators that take the most time. The call count is
what contention punishes: every parallel operator waits for all of torch's
threads, so on a machine where another process holds a core each call can
cost a scheduler time slice.

    python benchmarks/decode_profile.py                    # 2k context, bf16
    python benchmarks/decode_profile.py --context 8192 --dtype float32
    python benchmarks/decode_profile.py --context 32768 --variants ours-int4-kernel ours-int8-kernel \
        --out /tmp/profile32k   # where INT8's extra bytes go (issue 12)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from hf_kvcache_plugin import QuantizedKVCache

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import FORWARD_CACHE_KWARG, realistic_config, realistic_model  # noqa: E402
from records import Recorder, format_table, machine  # noqa: E402

VARIANTS = ("dynamic", "ours-int4-kernel", "ours-int4-reference", "ours-int8-kernel")
DEFAULT_VARIANTS = VARIANTS[:3]


@torch.inference_mode()
def profile(model, variant: str, prompt: torch.Tensor, steps: int, top: int) -> dict:
    model.set_attn_implementation("sdpa")
    if variant == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        # the reference variant is the path a machine without a compiler runs
        quant_type = variant.split("-")[1]
        cache = QuantizedKVCache(model.config, quant_type, cpu_kernel="off" if variant.endswith("reference") else "auto")
    kwargs = {FORWARD_CACHE_KWARG: cache, "use_cache": True, "logits_to_keep": 1}
    token = model(input_ids=prompt, **kwargs).logits[:, -1:].argmax(-1)
    for _ in range(2):  # warm-up steps
        token = model(input_ids=token, **kwargs).logits[:, -1:].argmax(-1)
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            token = model(input_ids=token, **kwargs).logits[:, -1:].argmax(-1)
    events = prof.key_averages()
    busiest = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    kernel_ms = sum(e.self_cpu_time_total for e in events if e.key.startswith("hf_kvcache::")) / steps / 1e3
    quantized_bytes = cache.get_stats()["quantized_bytes"] if variant != "dynamic" else 0
    return {
        "variant": variant,
        "quantized_bytes": quantized_bytes,
        "kernel_ms_per_step": kernel_ms,
        # the bytes the kernel ops read per step (every quantized byte, once) over their time
        "kernel_read_gb_per_s": quantized_bytes / kernel_ms / 1e6 if kernel_ms else None,
        "op_calls_per_step": sum(e.count for e in events) / steps,
        "self_cpu_ms_per_step": sum(e.self_cpu_time_total for e in events) / steps / 1e3,
        "top": [{"op": e.key, "calls_per_step": e.count / steps, "self_cpu_ms_per_step": e.self_cpu_time_total
                 / steps / 1e3} for e in busiest],
    }


def read_bandwidth_gb_per_s(mib: int = 256, repeats: int = 7) -> float:
    """What this machine streams from memory with torch's threads: a sum over a float32 tensor far larger than
    the caches, median of ``repeats`` (the ceiling a kernel that reads each byte once can approach)."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times) / 1e9


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--top", type=int, default=6)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    p.add_argument("--out")
    args = p.parse_args(argv)
    config = realistic_config()
    model = realistic_model(config).to(getattr(torch, args.dtype))
    host = machine()
    print(f"CPU: {host['cpu_model']}; flags: {' '.join(host['cpu_flags'])}; torch threads: {host['torch_threads']}")
    prompt = torch.randint(3, config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    settings = {"context": args.context, "dtype": args.dtype, "steps": args.steps, "variants": args.variants,
                "command": "python benchmarks/decode_profile.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    settings["read_bandwidth_gb_per_s"] = read_bandwidth_gb_per_s()
    print(f"memory read bandwidth (sum over 256 MiB): {settings['read_bandwidth_gb_per_s']:.1f} GB/s")
    rec = Recorder("decode_profile", settings, args.out)
    for variant in args.variants:
        row = rec.add(**profile(model, variant, prompt, args.steps, args.top))
        print(f"\n{variant}: {row['op_calls_per_step']:.0f} operator calls per decode step, "
              f"{row['self_cpu_ms_per_step']:.1f} ms CPU")
        if row["kernel_read_gb_per_s"]:
            print(f"kernel ops: {row['kernel_ms_per_step']:.1f} ms per step over {row['quantized_bytes'] / 1e6:.0f} MB "
                  f"of codes, scales and zeros: {row['kernel_read_gb_per_s']:.1f} GB/s")
        print(format_table(row["top"], ["op", "calls_per_step", "self_cpu_ms_per_step"]))
    rec.write()
    return {"rows": rec.rows}


if __name__ == "__main__":
    main()
