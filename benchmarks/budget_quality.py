"""Perplexity against the cache's byte budget (stories260K, TinyStories text), every cache in the same run.

The budget is a fraction (100%, 50%, 30%, 20%, 10%) of what a DynamicCache
holds for a whole 512-token window. Three caches are held to it:

- ``shrink``: INT8 that gets under the budget in the defined order
  (``budget_policy: repack_then_drop``: oldest blocks 8 -> 4 -> 2 bits, then
  the oldest blocks between the sinks and the window dropped);
- ``int4 fixed`` / ``int2 fixed``: the bits never change; over the budget the
  oldest blocks are dropped (``budget_policy: drop``), StreamingLLM-style.

Each reads every prediction after a ``--prompt``-token prefill through the
cache, ``--chunk`` tokens per forward step (1: token by token). Dropped tokens
leave a gap in the positions (no re-rotation). The table gives perplexity,
its ratio to DynamicCache's, the bytes held at the end against the budget,
the tokens per bit width and dropped at the end (summed over layers, keys),
and what each shrink step did.

With ``--prompt 384 --score-after-prompt`` the prompt alone is over the
smaller budgets: its own blocks are re-packed (or dropped) once stored, and
only the predictions that read the shrunk cache are scored
(``budget_quality_prompt384.json``); a budget under the policy's smallest form
of the prompt is refused, and the row says how many bytes it needs.

    python benchmarks/budget_quality.py [--quick]
    python benchmarks/budget_quality.py --windows 2 --prompt 384 --score-after-prompt
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import FORWARD_CACHE_KWARG, TINYSTORIES_VAL, stories_model  # noqa: E402
from records import RESULTS_DIR, Recorder, format_table, set_threads  # noqa: E402

from hf_kvcache_plugin import CacheBudgetExceeded, QuantizedKVCache  # noqa: E402
from hf_kvcache_plugin.budget import layer_nbytes  # noqa: E402
from hf_kvcache_plugin.evaluation import load_token_windows  # noqa: E402

warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

FRACTIONS = (1.0, 0.5, 0.3, 0.2, 0.1)
VARIANTS = {  # name: (quant_type, budget_policy)
    "shrink (int8, repack_then_drop)": ("int8", "repack_then_drop"),
    "shrink (int8, repack_to_4_then_drop)": ("int8", "repack_to_4_then_drop"),
    "int4 fixed (drop)": ("int4", "drop"),
    "int2 fixed (drop)": ("int2", "drop"),
}


@torch.inference_mode()
def perplexity(model, windows, make_cache, prompt: int, chunk: int, after_prompt: bool = False) -> tuple[float, object]:
    """Perplexity over ``windows`` where every prediction after ``prompt`` tokens reads the cache; the last cache.
    ``after_prompt``: only those predictions are scored (the prefill's own are exact in every cache)."""
    nll, count, cache = 0.0, 0, None
    for ids in windows:
        cache = make_cache()
        logits, start = [], 0
        while start < ids.shape[1] - 1:  # the last token is only a target
            end = min(start + (chunk if logits else prompt), ids.shape[1] - 1)
            out = model(input_ids=ids[:, start:end], use_cache=True, **{FORWARD_CACHE_KWARG: cache})
            logits.append(out.logits)
            start = end
        all_logits = torch.cat(logits, dim=1).float()
        targets = ids[:, 1:]
        if after_prompt:
            all_logits, targets = all_logits[:, prompt:], targets[:, prompt:]
        nll += torch.nn.functional.cross_entropy(all_logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return math.exp(nll / count), cache


def plot(rows: list[dict], base_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name in dict.fromkeys(r["cache"] for r in rows):
        mine = [r for r in rows if r["cache"] == name and r["perplexity"] is not None]
        ax.plot([100 * r["budget_fraction"] for r in mine], [r["perplexity"] for r in mine], marker="o", label=name)
    ax.axhline(base_ppl, color="gray", linestyle="--", label="DynamicCache")
    ax.set_xlabel("budget, % of DynamicCache bytes for a 512-token window")
    ax.set_ylabel("perplexity (stories260K, TinyStories)")
    ax.set_xscale("log")
    ax.set_xticks([100 * f for f in FRACTIONS], [f"{100 * f:g}%" for f in FRACTIONS])
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 window, 100%% and 20%% only")
    p.add_argument("--windows", type=int, default=4, help="511-token windows")
    p.add_argument("--prompt", type=int, default=32, help="tokens prefilled before predictions read the cache")
    p.add_argument("--chunk", type=int, default=1, help="tokens per forward step after the prefill")
    p.add_argument("--score-after-prompt", action="store_true",
                   help="score only the predictions after the prefill (with a long --prompt: a prompt over the "
                        "budget, re-packed or dropped once stored)")
    p.add_argument("--group-size", type=int, default=8, help="must divide head_dim 8")
    p.add_argument("--residual-length", type=int, default=16)
    p.add_argument("--sink-tokens", type=int, default=4)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args(argv)
    set_threads(args.threads)
    fractions = (1.0, 0.2) if args.quick else FRACTIONS
    windows_n = 1 if args.quick else args.windows

    model, tok = stories_model()
    cfg = model.config
    windows = load_token_windows(tok, TINYSTORIES_VAL, window=511, num_windows=windows_n)
    settings = {
        "model": "stories260K", "text": TINYSTORIES_VAL.name, "windows": windows_n, "window_tokens": 512,
        "prompt_tokens": args.prompt, "score_after_prompt": args.score_after_prompt, "chunk_tokens": args.chunk, "group_size": args.group_size,
        "residual_length": args.residual_length, "sink_tokens": args.sink_tokens, "fractions": fractions,
        "variants": {name: {"quant_type": q, "budget_policy": pol} for name, (q, pol) in VARIANTS.items()},
    }  # fmt: skip
    name = "budget_quality" + (f"_prompt{args.prompt}" if args.score_after_prompt else "")
    rec = Recorder(name + ("_quick" if args.quick else ""), settings, args.out)
    scoring = (args.prompt, args.chunk, args.score_after_prompt)

    base_ppl, dynamic = perplexity(model, windows, lambda: DynamicCache(config=cfg), *scoring)
    full_bytes = sum(layer_nbytes(layer) for layer in dynamic.layers)  # a whole window in full precision
    rec.extra["dynamic_cache"] = {"perplexity": base_ppl, "bytes": full_bytes}
    print(f"DynamicCache: perplexity {base_ppl:.4f}, {full_bytes} bytes for {dynamic.get_seq_length()} tokens")
    with torch.inference_mode():  # what the prompt alone holds at INT8: budgets below it shrink the prompt itself
        probe = QuantizedKVCache(cfg, "int8", group_size=args.group_size, residual_length=args.residual_length,
                                 sink_tokens=args.sink_tokens)  # fmt: skip
        model(input_ids=windows[0][:, : args.prompt], **{FORWARD_CACHE_KWARG: probe})
    rec.extra["prompt_int8_bytes"] = probe.get_stats()["total_bytes"]
    print(f"the {args.prompt}-token prompt at INT8: {rec.extra['prompt_int8_bytes']} bytes "
          f"({rec.extra['prompt_int8_bytes'] / full_bytes:.1%} of DynamicCache's window)")
    for fraction in fractions:
        for name in args.variants:
            quant_type, policy = VARIANTS[name]
            budget_mb = fraction * full_bytes / 2**20

            def make_cache(quant_type=quant_type, policy=policy, budget_mb=budget_mb):
                return QuantizedKVCache(
                    cfg, quant_type, group_size=args.group_size, residual_length=args.residual_length,
                    sink_tokens=args.sink_tokens, max_size_mb=budget_mb, budget_policy=policy,
                )  # fmt: skip

            try:
                ppl, cache = perplexity(model, windows, make_cache, *scoring)
            except CacheBudgetExceeded as exc:  # under the policy's smallest form of the prompt
                rec.add(cache=name, budget_fraction=fraction, budget_bytes=int(budget_mb * 2**20), perplexity=None,
                        refused=exc.needed_bytes)  # fmt: skip
                print(f"{100 * fraction:g}% {name}: refused, the prompt needs {exc.needed_bytes} bytes at least")
                continue
            stats = cache.get_stats()
            steps = stats["budget"]["steps"]
            rec.add(
                cache=name, budget_fraction=fraction, budget_bytes=stats["budget_bytes"], perplexity=ppl,
                ppl_ratio=ppl / base_ppl, held_bytes=stats["total_bytes"],
                held_fraction=stats["total_bytes"] / full_bytes,
                key_tokens_at_bits=stats["budget"]["tokens_at_bits"]["keys"],
                dropped_tokens=stats["budget"]["dropped_tokens"], steps=steps,
                repack_ms=1000 * (steps["repack_8_to_4"]["seconds"] + steps["repack_4_to_2"]["seconds"]),
                drop_ms=1000 * steps["drop"]["seconds"],
            )  # fmt: skip
            print(f"{100 * fraction:g}% {name}: perplexity {ppl:.4f}")
    columns = ["cache", "budget_fraction", "perplexity", "ppl_ratio", "held_fraction", "key_tokens_at_bits",
               "dropped_tokens", "repack_ms", "drop_ms", "refused"]  # fmt: skip
    print(format_table(rec.rows, columns, floatfmt=".4g"))
    out_dir = Path(args.out) if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(rec.rows, base_ppl, out_dir / f"{rec.name}.png")
    rec.write()
    return {"rows": rec.rows, "dynamic": rec.extra["dynamic_cache"]}


if __name__ == "__main__":
    main()
