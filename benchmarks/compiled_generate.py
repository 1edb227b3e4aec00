"""What ``generate``'s own ``torch.compile`` path gives on this CPU, next to our cache run eagerly.

``generate`` compiles the decode step itself only for a cache with ``is_compileable`` (a ``StaticCache``) and,
on CPU, only when ``compile_config._compile_all_devices`` is set (transformers' ``_valid_auto_compile_criteria``:
on CUDA, XPU, MPS, TPU and Neuron it needs no flag). This times, interleaved, at one context:

- ``dynamic``: ``DynamicCache``, eager;
- ``static``: ``StaticCache``, eager (``disable_compile``);
- ``static-compiled``: ``StaticCache`` compiled by ``generate`` (Inductor, ``mode="default"``: the default
  ``reduce-overhead`` is CUDA graphs);
- ``ours-int4``: our INT4 cache with its defaults, eager (``is_compileable`` is False);
- ``ours-static-int4``: ``StaticQuantizedKVCache`` (INT4, defaults), eager;
- ``ours-static-int4-compiled``: the same, compiled by ``generate`` as ``static-compiled`` is (one graph for
  every decode step: its shapes do not change);
- with ``--ours-compiled``, also ``ours-int4-compiled``: our cache with ``is_compileable`` forced on, so that
  ``generate`` compiles it like a static cache. An experiment, not a supported mode: a failure is recorded
  with its message instead of stopping the run.

The first call of each kind (the compile itself) is a warm-up and not timed. ``compiled_graphs`` counts
the graphs Dynamo compiled during a cache's calls: past ``torch._dynamo.config.recompile_limit`` (8) per
function, Dynamo runs the rest eagerly.

    python benchmarks/compiled_generate.py
    python benchmarks/compiled_generate.py --context 2048 --new-tokens 200 --ours-compiled
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import CompileConfig, DynamicCache, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import FORWARD_CACHE_KWARG, realistic_config, realistic_model  # noqa: E402
from records import Recorder, format_table, machine  # noqa: E402
from speed import StepClock  # noqa: E402

from hf_kvcache_plugin import CacheConfig, QuantizedKVCache, StaticQuantizedKVCache  # noqa: E402


CACHES = ("dynamic", "static", "static-compiled", "ours-int4", "ours-static-int4", "ours-static-int4-compiled",
          "ours-int4-compiled")


def _compile_config() -> CompileConfig:
    config = CompileConfig(mode="default")
    config._compile_all_devices = True  # a class attribute, not an argument: generate compiles on CPU only with it
    return config


def run_once(model, name: str, prompt: torch.Tensor, new_tokens: int) -> dict:
    config = model.config
    kwargs: dict = {"disable_compile": True}
    if name in ("static", "static-compiled"):
        cache = StaticCache(config=config, max_cache_len=prompt.shape[1] + new_tokens)
    elif name == "dynamic":
        cache = DynamicCache(config=config)
    elif name.startswith("ours-static"):
        cache = StaticQuantizedKVCache(config, max_cache_len=prompt.shape[1] + new_tokens, quant_type="int4")
    else:
        cache = QuantizedKVCache(config, cache_config=CacheConfig(quant_type="int4"))
    if name.endswith("-compiled"):
        kwargs = {"compile_config": _compile_config()}
        if name.startswith("ours-int4"):
            for layer in cache.layers:
                layer.is_compileable = True  # the experiment: generate then compiles our decode step
    clock = StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0,
                       **{FORWARD_CACHE_KWARG: cache}, **kwargs)
    return {"generate_s": time.perf_counter() - start, "generate_step_s": statistics.median(clock.step_times())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ours-compiled", action="store_true", help="also our cache with is_compileable forced on")
    p.add_argument("--caches", nargs="+", choices=CACHES, help="a subset of the caches (dynamic always runs)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    names = ["dynamic", "static", "static-compiled", "ours-int4", "ours-static-int4", "ours-static-int4-compiled"]
    names += ["ours-int4-compiled"] * args.ours_compiled
    if args.caches:
        names = ["dynamic"] + [n for n in args.caches if n != "dynamic"]  # the ratios' reference always runs
    config = realistic_config()
    base = realistic_model(config)
    host = machine()
    print(f"CPU: {host['cpu_model']}; flags: {' '.join(host['cpu_flags']) or 'none of interest'}; "
          f"torch threads: {host['torch_threads']}", flush=True)
    settings = {"context": args.context, "dtypes": args.dtypes, "new_tokens": args.new_tokens,
                "repeats": args.repeats, "caches": names, "inductor_mode": "default",
                "command": "python benchmarks/compiled_generate.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    rec = Recorder("compiled_generate", settings, args.out)
    prompt = torch.randint(3, config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    for dtype_name in args.dtypes:
        model = base.to(getattr(torch, dtype_name))
        model.set_attn_implementation("sdpa")
        torch._dynamo.reset()
        runs: dict[str, list[dict]] = {}
        failed: dict[str, str] = {}
        graphs = dict.fromkeys(names, 0)  # graphs Dynamo compiled during each cache's calls

        def timed(name: str) -> dict:
            before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            try:
                return run_once(model, name, prompt, args.new_tokens)
            finally:
                graphs[name] += torch._dynamo.utils.counters["stats"]["unique_graphs"] - before

        for name in names:  # warm-up, compiles included
            try:
                timed(name)
            except Exception as exc:  # noqa: BLE001 - the experiment's failure is a result
                failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                print(f"{dtype_name} {name}: failed: {failed[name]}", flush=True)
        live = [n for n in names if n not in failed]
        for repeat in range(args.repeats):
            shift = repeat % len(live)
            for name in live[shift:] + live[:shift]:
                runs.setdefault(name, []).append(timed(name))
        step_dynamic = statistics.median(r["generate_step_s"] for r in runs["dynamic"])
        for name in names:
            row = {"cache": name, "dtype": dtype_name, "context": args.context, "compiled_graphs": graphs[name]}
            if name in failed:
                rec.add(**row, error=failed[name])
                continue
            step = statistics.median(r["generate_step_s"] for r in runs[name])
            rec.add(**row, runs=runs[name], generate_step_s=step, step_vs_dynamic=step_dynamic / step,
                    generate_s=statistics.median(r["generate_s"] for r in runs[name]))
    print(format_table(rec.rows, ["dtype", "cache", "generate_step_s", "step_vs_dynamic", "generate_s",
                                  "compiled_graphs", "error"]))
    rec.write()
    return {"rows": rec.rows}


if __name__ == "__main__":
    main()
