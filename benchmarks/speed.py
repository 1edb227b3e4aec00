"""Decode speed as users run it: ``model.generate`` and a forward loop, side by side with DynamicCache.

For every context:batch point, dtype and cache (interleaved, repeated):

- ``generate``: one ``model.generate`` call (prefill + ``--new-tokens`` greedy
  tokens) timed whole, and per decode step (a streamer stamps each token;
  the median gap between tokens). Contexts above ``--max-prefill`` are not
  prefilled through the model (a 32k prefill takes minutes here): the cache
  is filled with random K/V of that length first and ``generate`` continues
  from it, so only its per-step time is reported.
- ``forward``: ``--new-tokens`` more single-token forward calls on the cache
  generate left behind (per-step medians).

Ratios are DynamicCache time / cache time: above 1 means faster than full
precision. Threads: the machine's default unless ``--threads``. The CPU model
and the instruction-set flags that decide bf16 speed (AVX-512, AVX512-BF16,
AMX) are printed and recorded with every run.

    python benchmarks/speed.py                         # the default grid, bf16 and fp32
    python benchmarks/speed.py --quick                 # 2k x 1 only, fewer tokens
    python benchmarks/speed.py --grid 2048:1 --dtypes bfloat16 --caches dynamic ours-int4
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from caches import CacheSpec, standard_specs  # noqa: E402
from models import FORWARD_CACHE_KWARG, realistic_config, realistic_model  # noqa: E402
from records import Recorder, format_table, machine  # noqa: E402

DEFAULT_GRID = ["2048:1", "8192:1", "2048:8", "32768:1"]
DEFAULT_CACHES = ["dynamic", "ours-int4", "ours-int8"]


class StepClock:
    """A ``generate`` streamer that stamps every call: the prompt first, then each new token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_times(self) -> list[float]:
        # stamps[1] is the first generated token (prefill included); decode steps are the gaps after it
        return [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]


def _spin() -> None:
    while True:
        pass


def start_busy(count: int) -> list[multiprocessing.Process]:
    """``count`` processes that keep a core busy: the contention of a shared machine, made reproducible."""
    procs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(count)]
    for proc in procs:
        proc.start()
    return procs


def fill_synthetic(cache, config, batch: int, context: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    """``context`` tokens of random K/V in every layer, appended the way a prefill appends them."""
    shape = (batch, config.num_key_value_heads, context, config.head_dim)
    for layer in range(config.num_hidden_layers):
        k = torch.randn(shape, generator=gen).to(dtype)
        v = torch.randn(shape, generator=gen).to(dtype)
        cache.update(k, v, layer)


@torch.inference_mode()
def run_once(model, spec: CacheSpec, prompt: torch.Tensor, new_tokens: int, synthetic: bool) -> dict:
    # kvquant_sdpa is plain SDPA for every cache but ours, and ours selects it itself (its default)
    model.set_attn_implementation("sdpa")
    cache = spec.make(model.config)
    if spec.family == "ours" and spec.options.get("attention", "fused") == "fused" and not cache.uses_fused_attention:
        raise RuntimeError(f"{spec.name}: the cache would not take the fused attention path")
    batch, context = prompt.shape
    if synthetic:
        fill_synthetic(cache, model.config, batch, context - 1, model.dtype, torch.Generator().manual_seed(1))
    clock = StepClock()
    start = time.perf_counter()
    out = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0,
        **{FORWARD_CACHE_KWARG: cache},
    )
    generate_s = time.perf_counter() - start
    token = out[:, -1:]
    forward_steps = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        logits = model(input_ids=token, use_cache=True, logits_to_keep=1, **{FORWARD_CACHE_KWARG: cache}).logits
        token = logits[:, -1:].argmax(-1)
        forward_steps.append(time.perf_counter() - t0)
    return {
        "generate_s": None if synthetic else generate_s,
        "generate_step_s": statistics.median(clock.step_times()),
        "forward_step_s": statistics.median(forward_steps),
        "seq_length": cache.get_seq_length(),
    }


def add_ratios(rows: list[dict]) -> None:
    """DynamicCache time / this cache's time, per point and dtype (> 1: faster than full precision)."""
    by_point: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_point.setdefault((r["dtype"], r["context"], r["batch"]), {})[r["cache"]] = r
    for point in by_point.values():
        ref = point.get("dynamic")
        if ref is None:
            continue
        for r in point.values():
            for key in ("generate_step_s", "forward_step_s", "generate_s"):
                if r.get(key) and ref.get(key):
                    r[f"{key.removesuffix('_s')}_vs_dynamic"] = ref[key] / r[key]


def measure(args, specs, base, config, grid, new_tokens: int, repeats: int, gen, runs: dict) -> None:
    """Every dtype, point and repeat, the caches interleaved; each run appended to ``runs``."""
    for dtype_name in args.dtypes:
        model = base.to(getattr(torch, dtype_name))
        # warm-up: lazy initialisation, the CPU kernel's build or load, first-touch page faults
        for spec in specs:
            run_once(model, spec, torch.randint(3, config.vocab_size, (1, 300), generator=gen), 4, synthetic=False)
        for context, batch in grid:
            prompt = torch.randint(3, config.vocab_size, (batch, context), generator=gen)
            synthetic = context > args.max_prefill
            for repeat in range(repeats):
                shift = repeat % len(specs)
                for spec in specs[shift:] + specs[:shift]:
                    r = run_once(model, spec, prompt, new_tokens, synthetic)
                    runs.setdefault((dtype_name, context, batch, spec.name), []).append(r)
                    whole = "-" if r["generate_s"] is None else f"{r['generate_s']:.2f}s"
                    print(f"{dtype_name} ctx {context} x {batch} {spec.name}: generate {whole}, step "
                          f"{r['generate_step_s'] * 1e3:.1f} ms (forward loop {r['forward_step_s'] * 1e3:.1f} ms)",
                          flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2048:1 only, 16 new tokens, 2 repeats")
    p.add_argument("--grid", nargs="+", help=f"context:batch points (default {' '.join(DEFAULT_GRID)})")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--new-tokens", type=int, help="decoded tokens per run (default 32; quick 16)")
    p.add_argument("--repeats", type=int, help="interleaved runs per cache and point (default 3; quick 2)")
    p.add_argument("--caches", nargs="+", help=f"default: {' '.join(DEFAULT_CACHES)}; also ours-int4-dequantize, "
                   "ours-int2, ours-mixed, quanto-int4, hqq-int4")
    p.add_argument("--max-prefill", type=int, default=8192,
                   help="longer contexts are filled with random K/V instead of a prefill (default 8192)")
    p.add_argument("--group-size", type=int, help="default: the cache's own (64 for head_dim 128)")
    p.add_argument("--residual-length", type=int, help="default: the cache's own (128)")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--threads", type=int, help="torch threads (default: the machine's default)")
    p.add_argument("--busy", type=int, default=0,
                   help="processes spinning on a core during the run (contention, as on a shared machine)")
    p.add_argument("--out")
    p.add_argument("--name", default="speed", help="results/<name>.json (has to start with 'speed')")
    args = p.parse_args(argv)
    if not args.name.startswith("speed"):
        raise SystemExit(f"--name has to start with 'speed' (the report reads speed*.json) but got {args.name!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = [tuple(int(x) for x in g.split(":")) for g in (args.grid or (["2048:1"] if args.quick else DEFAULT_GRID))]
    new_tokens = args.new_tokens or (16 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 3)
    specs = standard_specs(args.group_size, args.residual_length, tuple(args.caches or DEFAULT_CACHES))

    config = realistic_config(num_layers=args.num_layers, hidden_size=args.hidden_size,
                              intermediate_size=int(args.hidden_size * 2.75), vocab_size=args.vocab_size)
    base = realistic_model(config)
    host = machine()
    print(f"CPU: {host['cpu_model']}; flags: {' '.join(host['cpu_flags']) or 'none of interest'}; "
          f"torch threads: {host['torch_threads']}", flush=True)
    settings = {
        "grid": [{"context": c, "batch": b} for c, b in grid],
        "dtypes": args.dtypes,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "max_prefill": args.max_prefill,
        "busy_processes": args.busy,
        "model": {"layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                  "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                  "head_dim": config.head_dim, "intermediate_size": config.intermediate_size,
                  "vocab_size": config.vocab_size, "parameters": sum(p.numel() for p in base.parameters())},
        "specs": [s.to_dict() for s in specs],
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    rec = Recorder(args.name, settings, args.out)
    gen = torch.Generator().manual_seed(0)
    runs: dict[tuple, list[dict]] = {}
    busy = start_busy(args.busy)
    try:
        measure(args, specs, base, config, grid, new_tokens, repeats, gen, runs)
    finally:
        for proc in busy:
            proc.terminate()
    for (dtype_name, context, batch, name), rs in runs.items():
        row = {"cache": name, "dtype": dtype_name, "context": context, "batch": batch, "new_tokens": new_tokens,
               "synthetic_prefill": context > args.max_prefill, "repeats": len(rs), "runs": rs}
        for key in ("generate_s", "generate_step_s", "forward_step_s"):
            values = [r[key] for r in rs if r[key] is not None]
            row[key] = statistics.median(values) if values else None
        rec.add(**row)
    add_ratios(rec.rows)
    print(format_table(rec.rows, ["dtype", "cache", "context", "batch", "generate_step_s", "generate_step_vs_dynamic",
                                  "forward_step_vs_dynamic", "generate_s", "generate_vs_dynamic"]))
    rec.write()
    return {"rows": rec.rows}


if __name__ == "__main__":
    main()
