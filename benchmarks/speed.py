"""Speed: prefill and decode tokens/s of every cache on a realistic-shape Llama, interleaved, in one run.

For each (prompt length, batch): every repeat runs each cache once, in an order
rotated per repeat so that drifts in machine load fall on all caches alike:
prefill of the prompt (one forward, last-token logits only), then greedy decode
of ``new_tokens`` tokens one forward at a time. Wall time and process CPU time
are both recorded: other processes share this machine, and CPU time is what
the benchmark itself consumed. Reported: medians over repeats, tokens/s
counting every sequence of the batch, and ratios to DynamicCache and quanto.

    python benchmarks/speed.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_kvcache_plugin import QUANTIZED_ATTENTION, register_quantized_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))

from caches import standard_specs  # noqa: E402
from models import FORWARD_CACHE_KWARG, realistic_config, realistic_model  # noqa: E402
from records import Recorder, format_table, set_threads  # noqa: E402


class Clock:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self) -> "Clock":
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


@torch.inference_mode()
def run_once(model, spec, config, prompt: torch.Tensor, new_tokens: int) -> dict:
    # the fused variants run the same model with attention reading the packed blocks;
    # every other cache gets plain SDPA (kvquant_sdpa is SDPA for them anyway)
    model.set_attn_implementation(QUANTIZED_ATTENTION if spec.fused else "sdpa")
    cache = spec.make(model.config)
    if spec.fused and not cache.uses_fused_attention:
        raise RuntimeError(f"{spec.name}: the cache would not take the fused attention path")
    kwargs = {FORWARD_CACHE_KWARG: cache, "use_cache": True, "logits_to_keep": 1}
    with Clock() as prefill:
        out = model(input_ids=prompt, **kwargs)
    token = out.logits[:, -1:].argmax(-1)
    with Clock() as decode:
        for _ in range(new_tokens):
            out = model(input_ids=token, **kwargs)
            token = out.logits[:, -1:].argmax(-1)
    batch, length = prompt.shape
    return {
        "prefill_wall_s": prefill.wall,
        "prefill_cpu_s": prefill.cpu,
        "decode_wall_s": decode.wall,
        "decode_cpu_s": decode.cpu,
        "prefill_tok_s": batch * length / prefill.wall,
        "decode_tok_s": batch * new_tokens / decode.wall,
        "decode_tok_s_cpu": batch * new_tokens / decode.cpu,
        "seq_length": cache.get_seq_length(),
    }


def summarise(runs: list[dict]) -> dict:
    keys = ("prefill_tok_s", "decode_tok_s", "decode_tok_s_cpu", "prefill_wall_s", "decode_wall_s")
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {"repeats": len(runs)}


def add_ratios(rows: list[dict]) -> None:
    by_point: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_point.setdefault((r["context"], r["batch"]), {})[r["cache"]] = r
    for point in by_point.values():
        for r in point.values():
            for ref in ("dynamic", "quanto-int4"):
                if ref in point:
                    tag = ref.split("-")[0]
                    r[f"decode_vs_{tag}"] = r["decode_tok_s"] / point[ref]["decode_tok_s"]
                    r[f"decode_cpu_vs_{tag}"] = r["decode_tok_s_cpu"] / point[ref]["decode_tok_s_cpu"]
                    r[f"prefill_vs_{tag}"] = r["prefill_tok_s"] / point[ref]["prefill_tok_s"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--grid", nargs="+", help="context:batch points (default 512:1 2048:1 8192:1 512:8; quick 512:1)")
    p.add_argument("--new-tokens", type=int, help="decoded tokens per run (default 128; quick 48)")
    p.add_argument("--repeats", type=int, help="runs per cache and point (default 3; quick 2)")
    p.add_argument("--caches", nargs="+", help="default: dynamic, ours int4/int8 with and without fused attention, "
                   "quanto-int4, hqq-int4")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--residual-length", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    p.add_argument("--name", default="speed",
                   help="results/<name>.json; the report joins every speed*.json (runs of extra grid points)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    register_quantized_attention()
    # 2048:8 is left out of the default grid: with the peers' slow long-context decode it alone
    # would take most of an hour on a 2-core machine (pass --grid to add it)
    default_grid = ["512:1"] if args.quick else ["512:1", "2048:1", "8192:1", "512:8"]
    grid = [tuple(int(x) for x in g.split(":")) for g in (args.grid or default_grid)]
    new_tokens = args.new_tokens or (48 if args.quick else 128)
    repeats = args.repeats or (2 if args.quick else 3)
    names = args.caches or (
        ["dynamic", "ours-int4", "ours-int4-fused", "quanto-int4", "hqq-int4"]
        if args.quick
        else ["dynamic", "ours-int4", "ours-int8", "ours-int4-fused", "ours-int8-fused", "quanto-int4", "hqq-int4"]
    )
    specs = standard_specs(args.group_size, args.residual_length, tuple(names))

    config = realistic_config(num_layers=args.num_layers, hidden_size=args.hidden_size,
                              intermediate_size=int(args.hidden_size * 2.75), vocab_size=args.vocab_size)
    model = realistic_model(config)
    settings = {
        "quick": args.quick,
        "grid": [{"context": c, "batch": b} for c, b in grid],
        "new_tokens": new_tokens,
        "repeats": repeats,
        "model": {"layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                  "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                  "head_dim": config.head_dim, "intermediate_size": config.intermediate_size,
                  "vocab_size": config.vocab_size, "dtype": "bfloat16",
                  "parameters": sum(p.numel() for p in model.parameters())},
        "group_size": args.group_size,
        "residual_length": args.residual_length,
        "specs": [s.to_dict() for s in specs],
    }
    if not args.name.startswith("speed"):
        raise SystemExit(f"--name has to start with 'speed' (the report reads speed*.json) but got {args.name!r}")
    rec = Recorder(args.name, settings, args.out)
    gen = torch.Generator().manual_seed(0)
    # warm-up: first calls pay for lazy initialisation and first-touch page faults
    for spec in specs:
        run_once(model, spec, config, torch.randint(3, config.vocab_size, (1, 64), generator=gen), 4)
    runs_by_key: dict[tuple, list[dict]] = {}
    for context, batch in grid:
        prompt = torch.randint(3, config.vocab_size, (batch, context), generator=gen)
        for repeat in range(repeats):
            shift = repeat % len(specs)
            for spec in specs[shift:] + specs[:shift]:
                r = run_once(model, spec, config, prompt, new_tokens)
                runs_by_key.setdefault((context, batch, spec.name), []).append(r)
                print(f"ctx {context} batch {batch} {spec.name}: prefill {r['prefill_tok_s']:.0f} tok/s, "
                      f"decode {r['decode_tok_s']:.2f} tok/s (cpu {r['decode_tok_s_cpu']:.2f})", flush=True)
    for (context, batch, name), runs in runs_by_key.items():
        rec.add(cache=name, context=context, batch=batch, new_tokens=new_tokens, **summarise(runs), runs=runs)
    add_ratios(rec.rows)
    print(format_table(rec.rows, ["cache", "context", "batch", "prefill_tok_s", "decode_tok_s", "decode_tok_s_cpu",
                                  "decode_vs_dynamic", "decode_vs_quanto", "decode_cpu_vs_dynamic",
                                  "decode_cpu_vs_quanto"]))
    rec.write()
    return {"rows": rec.rows}


if __name__ == "__main__":
    main()
