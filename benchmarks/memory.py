"""Memory: exact cache bytes against DynamicCache and the physical floor, and peak process memory in decode.

1. Bytes (realistic shape): each cache is filled through ``cache.update`` with
   random bf16 K/V of Llama-3-8B's per-layer KV shape (8 KV heads, head_dim 128):
   a prefill of N - W tokens, then W single-token updates (W = decode window, so
   residual windows are mid-cycle, as in generation). Bytes are read from the
   cache's own tensors (``caches.cache_bytes``).
2. Bytes (stories260K, fp32): the same, driven by the real model on real text.
3. Peak RSS during decode: one fresh process per cache; the model decodes W'
   tokens (W' > residual window, so every cache flushes/re-quantizes at least
   once) from a cache pre-filled with N tokens, while a thread samples the
   process RSS with psutil every millisecond. glibc's mmap threshold is fixed
   (MALLOC_MMAP_THRESHOLD_) so freed large buffers leave the RSS instead of
   lingering in the heap; transient dequantized copies are therefore counted
   when they are live, and only then.

    python benchmarks/memory.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from caches import CacheSpec, cache_bytes, standard_specs  # noqa: E402
from models import FORWARD_CACHE_KWARG, realistic_config, realistic_model, stories_model, story_text  # noqa: E402
from records import Recorder, format_table, set_threads  # noqa: E402

from hf_kvcache_plugin import QuantizedKVLayer  # noqa: E402

PEAK_CACHES = ("dynamic", "ours-int8", "ours-int4", "ours-int2", "quanto-int4", "hqq-int4")


def _aged_fraction(cache, spec: CacheSpec, context: int) -> float:
    """Share of tokens held INT4 by a mixed cache (the rest of its quantized tokens are INT8)."""
    if spec.quant_type != "mixed":
        return 0.0
    layer = next(layer for layer in cache.layers if isinstance(layer, QuantizedKVLayer))
    blocks = layer.quantized_keys
    aged = 0 if blocks.aged is None else blocks.aged.shape[2] * blocks.codec.group_size
    return aged / context


def _row(spec: CacheSpec, cache, context: int, elements: int, dtype: torch.dtype, dynamic_total: int | None):
    b = cache_bytes(cache)
    bits = 8 * b["total"] / elements
    floor = spec.floor_bits(dtype, _aged_fraction(cache, spec, context) if spec.family == "ours" else 0.0)
    return {
        "cache": spec.name,
        "family": spec.family,
        "nominal_bits": spec.bits,
        "context": context,
        "total_bytes": b["total"],
        "quantized_bytes": b["quantized"],
        "full_precision_bytes": b["full_precision"],
        "bits_per_element": bits,
        "floor_bits_per_element": floor,
        "over_floor": bits / floor - 1,
        "ratio_to_dynamic": None if dynamic_total is None else b["total"] / dynamic_total,
    }


@torch.inference_mode()
def realistic_bytes(specs, contexts, num_layers: int, window: int) -> list[dict]:
    config = realistic_config(num_layers=num_layers)
    heads, head_dim = config.num_key_value_heads, config.head_dim
    gen = torch.Generator().manual_seed(0)
    rows = []
    for context in contexts:
        # the same K/V for every cache: [1, heads, context, head_dim] per layer
        kv = [
            (torch.randn(1, heads, context, head_dim, generator=gen).to(torch.bfloat16),
             torch.randn(1, heads, context, head_dim, generator=gen).to(torch.bfloat16))
            for _ in range(num_layers)
        ]
        elements = num_layers * 2 * heads * context * head_dim
        dynamic_total = None
        for spec in specs:
            cache = spec.make(config)
            prefill = context - window
            for layer, (k, v) in enumerate(kv):
                cache.update(k[:, :, :prefill], v[:, :, :prefill], layer)
            for t in range(prefill, context):
                for layer, (k, v) in enumerate(kv):
                    cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], layer)
            assert cache.get_seq_length() == context
            row = _row(spec, cache, context, elements, torch.bfloat16, dynamic_total)
            if spec.family == "dynamic":
                dynamic_total = row["total_bytes"]
                row["ratio_to_dynamic"] = 1.0
            rows.append({"model": "realistic", **row})
            del cache
            gc.collect()
    return rows


@torch.inference_mode()
def stories_bytes(specs, contexts, window: int) -> list[dict]:
    model, tok = stories_model()
    ids = tok(story_text(20000), return_tensors="pt")["input_ids"]
    cfg = model.config
    heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    rows = []
    for context in contexts:
        elements = cfg.num_hidden_layers * 2 * heads * context * head_dim
        dynamic_total = None
        for spec in specs:
            cache = spec.make(cfg)
            prefill = context - window
            model(input_ids=ids[:, :prefill], use_cache=True, **{FORWARD_CACHE_KWARG: cache})
            for t in range(prefill, context):
                model(input_ids=ids[:, t : t + 1], use_cache=True, **{FORWARD_CACHE_KWARG: cache})
            row = _row(spec, cache, context, elements, model.dtype, dynamic_total)
            if spec.family == "dynamic":
                dynamic_total = row["total_bytes"]
                row["ratio_to_dynamic"] = 1.0
            rows.append({"model": "stories260K", **row})
    return rows


# ---------------------------------------------------------------------------------------------- peak RSS
class RssSampler:
    """Highest resident set size seen by a thread polling psutil (torch releases the GIL inside ops)."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.samples += 1
            time.sleep(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


@torch.inference_mode()
def peak_worker(spec_name: str, context: int, steps: int, num_layers: int, group_size: int, residual: int) -> dict:
    """Runs in a fresh process: RSS of model, of the filled cache, and the peak while decoding."""
    spec = next(s for s in standard_specs(group_size, residual) if s.name == spec_name)
    process = psutil.Process()
    config = realistic_config(num_layers=num_layers)
    model = realistic_model(config)
    gc.collect()
    rss_model = process.memory_info().rss
    cache = spec.make(config)
    gen = torch.Generator().manual_seed(0)
    for layer in range(num_layers):
        k = torch.randn(1, config.num_key_value_heads, context, config.head_dim, generator=gen).to(torch.bfloat16)
        cache.update(k, k.clone(), layer)
        del k
    gc.collect()
    rss_filled = process.memory_info().rss
    token = torch.tensor([[5]])
    with RssSampler() as sampler:
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **{FORWARD_CACHE_KWARG: cache})
            token = out.logits[:, -1:].argmax(-1)
    return {
        "cache": spec_name,
        "context": context + steps,
        "decode_steps": steps,
        "cache_bytes_after": cache_bytes(cache)["total"],
        "rss_model_mib": rss_model / 2**20,
        "rss_cache_at_rest_mib": (rss_filled - rss_model) / 2**20,
        "peak_decode_above_model_mib": (sampler.peak - rss_model) / 2**20,
        "rss_samples": sampler.samples,
    }


def peak_rss(specs, context: int, steps: int, num_layers: int, group_size: int, residual: int, threads: int):
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", PYTHONWARNINGS="ignore")
    for spec in specs:
        cmd = [
            sys.executable, __file__, "--peak-worker", spec.name, "--peak-context", str(context),
            "--peak-steps", str(steps), "--num-layers", str(num_layers), "--group-size", str(group_size),
            "--residual-length", str(residual), "--threads", str(threads),
        ]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"peak worker for {spec.name} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    dyn = next((r for r in rows if r["cache"] == "dynamic"), None)
    for r in rows:
        r["peak_ratio_to_dynamic"] = r["peak_decode_above_model_mib"] / dyn["peak_decode_above_model_mib"] if dyn else None
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer and shorter contexts")
    p.add_argument("--contexts", type=int, nargs="+", help="realistic-shape contexts (default 512 2048 8192 32768)")
    p.add_argument("--stories-contexts", type=int, nargs="+", help="stories260K contexts (default 128 256 512)")
    p.add_argument("--num-layers", type=int, default=2, help="layers of the realistic shape (bytes scale linearly)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--residual-length", type=int, default=128)
    p.add_argument("--window", type=int, default=64, help="single-token updates after the prefill")
    p.add_argument("--peak-context", type=int, help="context for the peak-RSS decode (default 8192; quick 2048)")
    p.add_argument("--peak-steps", type=int, help="decode steps for peak RSS (default residual_length + 8)")
    p.add_argument("--peak-layers", type=int, default=4)
    p.add_argument("--no-peak", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument("--caches", nargs="+", help="subset of cache names")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="results directory (default benchmarks/results)")
    p.add_argument("--peak-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    set_threads(args.threads)

    if args.peak_worker:
        row = peak_worker(args.peak_worker, args.peak_context, args.peak_steps, args.num_layers, args.group_size,
                          args.residual_length)
        print(json.dumps(row))
        return row

    contexts = args.contexts or ([512, 2048] if args.quick else [512, 2048, 8192, 32768])
    stories_contexts = args.stories_contexts or ([256, 512] if args.quick else [128, 256, 512])
    peak_context = args.peak_context or (1024 if args.quick else 8192)
    peak_steps = args.peak_steps or args.residual_length + 8
    include = tuple(args.caches) if args.caches else None
    specs = standard_specs(args.group_size, args.residual_length, include)
    stories_specs = standard_specs(8, 32, include, mixed_int8_tokens=128)
    settings = {
        "quick": args.quick,
        "contexts": contexts,
        "stories_contexts": stories_contexts,
        "num_layers": args.num_layers,
        "kv_heads": 8,
        "head_dim": 128,
        "dtype": "bfloat16",
        "group_size": args.group_size,
        "residual_length": args.residual_length,
        "decode_window": args.window,
        "stories_group_size": 8,
        "stories_residual_length": 32,
        "stories_mixed_int8_tokens": 128,
        "peak_context": peak_context,
        "peak_steps": peak_steps,
        "peak_layers": args.peak_layers,
        "peak_method": "psutil RSS sampled every 1 ms in a thread, fresh process per cache, "
        "MALLOC_MMAP_THRESHOLD_=131072; peak minus RSS after model load",
        "specs": [s.to_dict() for s in specs],
    }
    rec = Recorder("memory", settings, args.out)
    rows = realistic_bytes(specs, contexts, args.num_layers, args.window)
    rows += stories_bytes(stories_specs, stories_contexts, min(args.window, 32))
    rec.rows = rows
    cols = ["model", "cache", "context", "total_bytes", "ratio_to_dynamic", "bits_per_element",
            "floor_bits_per_element", "over_floor"]
    print(format_table(rows, cols))
    if not args.no_peak:
        peak_specs = [s for s in specs if s.name in PEAK_CACHES]
        peak_rows = peak_rss(peak_specs, peak_context, peak_steps, args.peak_layers, args.group_size,
                             args.residual_length, args.threads)
        rec.extra["peak_decode"] = peak_rows
        print(format_table(peak_rows, ["cache", "context", "cache_bytes_after", "rss_cache_at_rest_mib",
                                       "peak_decode_above_model_mib", "peak_ratio_to_dynamic", "rss_samples"]))
    rec.write()
    return {"rows": rows, **rec.extra}


if __name__ == "__main__":
    main()
