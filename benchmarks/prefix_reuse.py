"""Prefix reuse: N requests sharing a long prefix with different suffixes, with and without the store.

Each request runs twice, side by side: once with a fresh QuantizedKVCache (no
store) and once through `attach_prefix_cache` (the first request fills the
store, the others hit it). Time to first token is taken the same way for both
(a stopping criterion that notes the first new token); outputs are compared
token by token (same seed). Then a memory-pressure simulation drives an
AdaptiveSizer with injected readings and a fake clock and plots its budget.

Models: a randomly initialised Llama of realistic shape (head_dim 64, 4 layers,
2048 positions; timing does not depend on the weights) with a 1024-token
prefix, and the real stories260K model (512 positions) with a 384-token
TinyStories prefix when ../shared/data holds the text.

    python benchmarks/prefix_reuse.py            # 16 requests, INT8 and INT4
    python benchmarks/prefix_reuse.py --quick    # 6 requests, fewer new tokens
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_kvcache_plugin import (
    AdaptiveSizer,
    CacheConfig,
    MemoryMonitor,
    MemoryReading,
    PrefixStore,
    QuantizedKVCache,
    SizerConfig,
    attach_prefix_cache,
)
from hf_kvcache_plugin._compat import GENERATE_CACHE_KWARG
from hf_kvcache_plugin.embedded import STORIES260K
from hf_kvcache_plugin.token_clock import TokenClock

REPO = Path(__file__).resolve().parents[1]
REAL_MODEL = STORIES260K
TEXT = REPO.parent / "shared" / "data" / "tinystories_val.txt"
RESULTS = Path(__file__).parent / "results"


def timed_generate(model, ids: torch.Tensor, new_tokens: int, cache=None) -> tuple[torch.Tensor, float, float]:
    """(sequences, time to first token s, total s), greedy, fixed length."""
    clock = TokenClock()
    extra = {} if cache is None else {GENERATE_CACHE_KWARG: cache}
    start = time.perf_counter()
    out = model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         stopping_criteria=[clock], **extra)
    return out, clock.first - start, time.perf_counter() - start


def realistic_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def run_workload(model, prefix: torch.Tensor, suffixes: list[torch.Tensor], cache_config: CacheConfig,
                 chunk_size: int, new_tokens: int) -> dict:
    store = PrefixStore(max_size_mb=256, chunk_size=chunk_size)
    rows = []
    timed_generate(model, torch.cat([prefix, suffixes[0]]).unsqueeze(0), 2,
                   QuantizedKVCache(model.config, cache_config=cache_config))  # warm-up, not counted
    for i, suffix in enumerate(suffixes):
        ids = torch.cat([prefix, suffix]).unsqueeze(0)
        # the baseline: plain generate with a fresh cache, no store
        plain, plain_ttft, plain_total = timed_generate(
            model, ids, new_tokens, QuantizedKVCache(model.config, cache_config=cache_config))
        with attach_prefix_cache(model, store, cache_config) as hook:  # the same store every time
            reused, reuse_ttft, reuse_total = timed_generate(model, ids, new_tokens)
        record = hook.records[-1]
        new_plain, new_reused = plain[0, ids.shape[1]:], reused[0, ids.shape[1]:]
        rows.append({
            "request": i, "prompt_tokens": ids.shape[1], "hit_tokens": record.hit_tokens,
            "ttft_plain_ms": plain_ttft * 1e3, "ttft_reuse_ms": reuse_ttft * 1e3,
            "total_plain_ms": plain_total * 1e3, "total_reuse_ms": reuse_total * 1e3,
            "lookup_ms": record.lookup_ms, "load_ms": record.load_ms,
            "identical": bool(torch.equal(plain, reused)),
            "token_agreement": (new_plain == new_reused).float().mean().item(),
        })
    hits = [r for r in rows if r["hit_tokens"] > 0]
    median = lambda key, rs: statistics.median(r[key] for r in rs) if rs else math.nan  # noqa: E731
    stats = store.stats()
    summary = {
        "requests": len(rows),
        "prefix_tokens": len(prefix),
        "suffix_tokens": len(suffixes[0]),
        "new_tokens": new_tokens,
        "quant_type": cache_config.quant_type,
        "group_size": hook.cache_config.group_size,
        "chunk_size": chunk_size,
        "ttft_plain_median_ms": median("ttft_plain_ms", rows),
        "ttft_reuse_hit_median_ms": median("ttft_reuse_ms", hits),
        "ttft_reuse_first_request_ms": rows[0]["ttft_reuse_ms"],
        "total_plain_median_ms": median("total_plain_ms", rows),
        "total_reuse_hit_median_ms": median("total_reuse_ms", hits),
        "request_hit_rate": len(hits) / len(rows),
        "token_hit_rate": sum(r["hit_tokens"] for r in rows) / sum(r["prompt_tokens"] for r in rows),
        "store_bytes": stats["used_bytes"],
        "store_entries": stats["entries"],
        "identical_outputs": sum(r["identical"] for r in rows),
        "mean_token_agreement": statistics.mean(r["token_agreement"] for r in rows),
    }
    summary["ttft_speedup"] = summary["ttft_plain_median_ms"] / summary["ttft_reuse_hit_median_ms"]
    summary["total_speedup"] = summary["total_plain_median_ms"] / summary["total_reuse_hit_median_ms"]
    return {"summary": summary, "requests": rows}


def simulate_pressure(hit_ms: float, miss_ms: float, ticks: int) -> dict:
    """An AdaptiveSizer under a scripted memory trace (injected readings, fake clock, 5 s per tick).

    The workload's working set is 600 MiB of prefixes: with a smaller budget the
    store is full and a share of requests miss (in proportion to what does not
    fit); hit and miss latencies are the measured TTFTs.
    """
    now = [0.0]
    used = [0.5]
    config = SizerConfig(min_size_mb=32, max_size_mb=1024, initial_size_mb=128, interval_s=5, cooldown_s=30,
                         request_window=50)
    working_set_mb = 600.0
    sizer = AdaptiveSizer(
        config,
        monitor=MemoryMonitor(window=6, clock=lambda: now[0], reader=lambda: MemoryReading.at_fraction(used[0])),
        clock=lambda: now[0],
        usage_bytes=lambda: int(min(sizer.current_size_mb, working_set_mb) * 2**20),
    )
    trace = []
    for t in range(ticks):
        phase = t / ticks
        # calm, a slow climb through MODERATE into HIGH, a spike to CRITICAL, recovery
        if phase < 0.3:
            used[0] = 0.50 + 0.02 * math.sin(t / 3)
        elif phase < 0.55:
            used[0] = 0.50 + (phase - 0.3) / 0.25 * 0.40
        elif phase < 0.62:
            used[0] = 0.97
        else:
            used[0] = 0.60 - 0.1 * (phase - 0.62) + 0.02 * math.sin(t / 3)
        hit_share = min(1.0, sizer.current_size_mb / working_set_mb)
        for i in range(10):  # ten requests per tick
            if (i + 0.5) / 10 < hit_share:
                sizer.record_hit(hit_ms)
            else:
                sizer.record_miss(miss_ms)
        decision = sizer.step()
        trace.append({"t_s": now[0], "used_fraction": used[0], "budget_mb": decision.new_size_mb,
                      "pressure": decision.pressure.value, "action": decision.action})
        now[0] += 5.0
    actions = [r["action"] for r in trace]
    return {"config": {k: getattr(config, k) for k in ("min_size_mb", "max_size_mb", "initial_size_mb",
                                                       "cooldown_s", "moderate_pressure", "high_pressure",
                                                       "critical_pressure")},
            "working_set_mb": working_set_mb, "hit_ms": hit_ms, "miss_ms": miss_ms,
            "counts": {a: actions.count(a) for a in ("grow", "shrink", "emergency", "hold")}, "trace": trace}


def plot_trace(simulation: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace, cfg = simulation["trace"], simulation["config"]
    t = [r["t_s"] for r in trace]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9.5, 5.5), sharex=True)
    top.plot(t, [r["used_fraction"] for r in trace], color="black", label="used memory (injected)")
    for name, color in (("moderate_pressure", "gold"), ("high_pressure", "orange"), ("critical_pressure", "red")):
        top.axhline(cfg[name], color=color, linestyle="--", linewidth=1, label=name.replace("_", " "))
    top.set_ylabel("used fraction")
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    bottom.step(t, [r["budget_mb"] for r in trace], where="post", color="tab:blue", label="store budget")
    for action, marker, color in (("grow", "^", "green"), ("shrink", "v", "orange"), ("emergency", "x", "red")):
        points = [(r["t_s"], r["budget_mb"]) for r in trace if r["action"] == action]
        if points:
            bottom.scatter(*zip(*points), marker=marker, color=color, label=action, zorder=3)
    bottom.axhline(simulation["working_set_mb"], color="grey", linestyle=":", label="working set")
    bottom.set_ylabel("budget (MiB)")
    bottom.set_xlabel("time (s, simulated)")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    fig.suptitle("AdaptiveSizer under injected memory pressure")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(name: str, s: dict) -> None:
    print(f"{name:34} {s['quant_type']:5} prefix {s['prefix_tokens']:>5} | TTFT plain {s['ttft_plain_median_ms']:8.1f} ms"
          f"  reuse {s['ttft_reuse_hit_median_ms']:7.1f} ms  x{s['ttft_speedup']:5.1f} | total x{s['total_speedup']:4.1f}"
          f" | hit rate {s['request_hit_rate']:.2f} (tokens {s['token_hit_rate']:.2f}) | store {s['store_bytes']:>9} B"
          f" | identical {s['identical_outputs']}/{s['requests']}  agreement {s['mean_token_agreement']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 requests, 8 new tokens, INT8 only for the real model")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--prefix-tokens", type=int, default=1024)
    parser.add_argument("--suffix-tokens", type=int, default=32)
    parser.add_argument("--real-prefix-tokens", type=int, default=384)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args()
    requests = args.requests or (6 if args.quick else 16)
    new_tokens = args.new_tokens or (8 if args.quick else 16)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "_quick" if args.quick else ""
    results: dict = {"command": "python benchmarks/prefix_reuse.py" + (" --quick" if args.quick else ""),
                     "device": "cpu", "threads": args.threads, "torch": torch.__version__, "workloads": {}}

    model = realistic_model()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, model.config.vocab_size, (args.prefix_tokens,), generator=g)
    suffixes = [torch.randint(3, model.config.vocab_size, (args.suffix_tokens,), generator=g) for _ in range(requests)]
    for quant_type in ("int8", "int4"):
        cfg = CacheConfig(quant_type=quant_type, residual_length=128)  # group_size: min(64, head_dim) = 64
        name = f"random_llama_hd64_{quant_type}"
        results["workloads"][name] = run_workload(model, prefix, suffixes, cfg, 256, new_tokens)
        print_summary(name, results["workloads"][name]["summary"])

    if (REAL_MODEL / "config.json").is_file() and TEXT.is_file():
        real = AutoModelForCausalLM.from_pretrained(REAL_MODEL).eval()
        tok = AutoTokenizer.from_pretrained(REAL_MODEL)
        ids = tok(TEXT.read_text()[:60000], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        real_prefix = ids[: args.real_prefix_tokens]
        starts = range(2000, 2000 + 500 * requests, 500)
        real_suffixes = [ids[s : s + args.suffix_tokens] for s in starts]
        for quant_type in ("int8",) if args.quick else ("int8", "int4"):
            cfg = CacheConfig(quant_type=quant_type, group_size=8, residual_length=32)
            name = f"stories260K_{quant_type}"
            results["workloads"][name] = run_workload(real, real_prefix, real_suffixes, cfg, 64, new_tokens)
            print_summary(name, results["workloads"][name]["summary"])
    else:
        print(f"(no real-model rows: {REAL_MODEL} or {TEXT} missing)")

    main_summary = results["workloads"]["random_llama_hd64_int8"]["summary"]
    simulation = simulate_pressure(main_summary["ttft_reuse_hit_median_ms"], main_summary["ttft_plain_median_ms"],
                                   ticks=120)
    results["sizer_simulation"] = simulation
    plot_path = out_dir / f"prefix_reuse_sizer_trace{tag}.png"
    plot_trace(simulation, plot_path)
    print(f"sizer simulation: {simulation['counts']}, budget {simulation['trace'][0]['budget_mb']:.0f} -> "
          f"max {max(r['budget_mb'] for r in simulation['trace']):.0f} -> "
          f"min {min(r['budget_mb'] for r in simulation['trace']):.0f} -> "
          f"end {simulation['trace'][-1]['budget_mb']:.0f} MiB")
    json_path = out_dir / f"prefix_reuse{tag}.json"
    json_path.write_text(json.dumps(results, indent=1))
    print(f"wrote {json_path} and {plot_path}")


if __name__ == "__main__":
    main()
