"""Quality on stories260K (real weights, real TinyStories text), every cache in the same run.

1. Perplexity with every prediction after a 64-token prefill read back through
   the cache (``evaluation.perplexity_through_cache``), on 511-token windows.
2. Relative attention-output error per layer, ||out - ref|| / ||ref||, during
   those same decode steps: a registered attention function runs SDPA twice,
   on the K/V the cache returned and on the exact K/V the layer produced in the
   same run (recorded by wrapping ``cache.update``); mean over steps.
3. Greedy-continuation agreement with DynamicCache: batches of 32-token prompts
   from the text, 64 new tokens each; the fraction of positions where the
   greedy token equals DynamicCache's, and the mean length of the common prefix.

    python benchmarks/quality.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))

from caches import cache_bytes, standard_specs  # noqa: E402
from models import FORWARD_CACHE_KWARG, TINYSTORIES_VAL, stories_model  # noqa: E402
from records import Recorder, format_table, set_threads  # noqa: E402

from hf_kvcache_plugin.evaluation import load_token_windows, perplexity_through_cache  # noqa: E402

PROBE = "kvbench_attention_probe"

# evaluation.perplexity_through_cache passes the cache as `past_key_values` (deprecated alias in 5.24)
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)


class AttentionProbe:
    """Relative error of each layer's attention output: the cache's K/V against the exact K/V."""

    def __init__(self):
        self.active = False
        self.exact: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.errors: dict[int, list[float]] = defaultdict(list)

    def watch(self, cache):
        """Record the exact K/V every layer sends to ``cache`` (new cache: new history)."""
        self.exact = {}
        update = cache.update

        def recording_update(key_states, value_states, layer_idx, *args, **kwargs):
            if layer_idx in self.exact:
                k, v = self.exact[layer_idx]
                key_states_all = torch.cat([k, key_states], dim=-2)
                value_states_all = torch.cat([v, value_states], dim=-2)
            else:
                key_states_all, value_states_all = key_states, value_states
            self.exact[layer_idx] = (key_states_all, value_states_all)
            return update(key_states, value_states, layer_idx, *args, **kwargs)

        cache.update = recording_update
        return cache

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if self.active and query.shape[2] == 1 and module.layer_idx in self.exact:
            exact_k, exact_v = self.exact[module.layer_idx]
            ref, _ = sdpa_attention_forward(module, query, exact_k, exact_v, attention_mask, **kwargs)
            self.errors[module.layer_idx].append(((out - ref).norm() / ref.norm()).item())
        return out, weights

    def take_errors(self) -> list[float]:
        per_layer = [sum(e) / len(e) for _, e in sorted(self.errors.items())]
        self.errors = defaultdict(list)
        return per_layer


def story_prompts(tok, count: int, length: int, start_token: int) -> torch.Tensor:
    """``count`` prompts of ``length`` tokens (``<s>`` + text), consecutive slices of the validation text."""
    ids = tok(TINYSTORIES_VAL.read_text()[:400000], add_special_tokens=False)["input_ids"]
    body = length - 1
    need = start_token + count * body
    if len(ids) < need:
        raise ValueError(f"{TINYSTORIES_VAL} has {len(ids)} tokens in its first 400k characters, need {need}")
    rows = [[tok.bos_token_id] + ids[start_token + i * body : start_token + (i + 1) * body] for i in range(count)]
    return torch.tensor(rows)


@torch.inference_mode()
def greedy_tokens(model, prompts: torch.Tensor, make_cache, new_tokens: int, batch: int) -> torch.Tensor:
    outs = []
    for start in range(0, prompts.shape[0], batch):
        ids = prompts[start : start + batch]
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            **{FORWARD_CACHE_KWARG: make_cache()},
        )
        outs.append(out[:, ids.shape[1] :])
    return torch.cat(outs)


def agreement(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(fraction of equal positions, mean length of the common prefix)."""
    equal = ref == out
    prefix = equal.int().cumprod(dim=1).sum(dim=1).float()
    return equal.float().mean().item(), prefix.mean().item()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--windows", type=int, help="511-token perplexity windows (default 16; quick 2)")
    p.add_argument("--prompts", type=int, help="greedy prompts (default 64; quick 16)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    p.add_argument("--group-size", type=int, default=8, help="must divide head_dim 8")
    p.add_argument("--residual-length", type=int, default=32)
    p.add_argument("--mixed-int8-tokens", type=int, default=128, help="< the 511-token window, so blocks age")
    p.add_argument("--caches", nargs="+")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args(argv)
    set_threads(args.threads)
    windows_n = args.windows or (2 if args.quick else 16)
    prompts_n = args.prompts or (16 if args.quick else 64)

    model, tok = stories_model()
    cfg = model.config
    probe = AttentionProbe()
    AttentionInterface.register(PROBE, probe.attention)
    AttentionMaskInterface.register(PROBE, sdpa_mask)
    model.set_attn_implementation(PROBE)

    specs = standard_specs(
        args.group_size, args.residual_length, tuple(args.caches) if args.caches else None, args.mixed_int8_tokens
    )
    if specs[0].name != "dynamic":
        raise ValueError("the cache list has to include `dynamic` (the reference)")
    windows = load_token_windows(tok, TINYSTORIES_VAL, window=511, num_windows=windows_n)
    # prompts come from text after the perplexity windows
    prompts = story_prompts(tok, prompts_n, args.prompt_length, start_token=511 * windows_n)
    heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    settings = {
        "model": "stories260K",
        "text": TINYSTORIES_VAL.name,
        "windows": windows_n,
        "window_tokens": 512,
        "prefill_tokens": 64,
        "prompts": prompts_n,
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "group_size": args.group_size,
        "residual_length": args.residual_length,
        "mixed_int8_tokens": args.mixed_int8_tokens,
        "compute_dtype": str(model.dtype),
        "specs": [s.to_dict() for s in specs],
    }
    rec = Recorder("quality", settings, args.out)

    reference_tokens = greedy_tokens(model, prompts, lambda: DynamicCache(config=cfg), args.new_tokens, args.batch)
    base_ppl = None
    for spec in specs:
        last = {}

        def make_cache(spec=spec, last=last):
            last["cache"] = probe.watch(spec.make(cfg))
            return last["cache"]

        probe.active = True
        ppl = perplexity_through_cache(model, windows, make_cache)
        probe.active = False
        attn = probe.take_errors()
        cache = last["cache"]
        seq = cache.get_seq_length()
        bits = 8 * cache_bytes(cache)["total"] / (cfg.num_hidden_layers * 2 * heads * seq * head_dim)
        if spec.family == "dynamic":
            base_ppl = ppl
            tokens = reference_tokens
        else:
            tokens = greedy_tokens(model, prompts, lambda spec=spec: spec.make(cfg), args.new_tokens, args.batch)
        agree, prefix = agreement(reference_tokens, tokens)
        row = rec.add(
            cache=spec.name,
            family=spec.family,
            nominal_bits=spec.bits,
            bits_per_element=bits,
            perplexity=ppl,
            ppl_delta_pct=100 * (ppl / base_ppl - 1),
            greedy_agreement=agree,
            common_prefix_tokens=prefix,
            attn_rel_error_mean=(sum(attn) / len(attn)) if attn else 0.0,
            attn_rel_error_per_layer=attn,
        )
        print(f"{spec.name}: ppl {ppl:.4f} ({row['ppl_delta_pct']:+.3f}%), agreement {agree:.3f}", flush=True)
        if not math.isfinite(ppl):
            print(f"warning: {spec.name} perplexity is not finite", file=sys.stderr)
    print(format_table(rec.rows, ["cache", "bits_per_element", "perplexity", "ppl_delta_pct", "greedy_agreement",
                                  "common_prefix_tokens", "attn_rel_error_mean"], floatfmt=".4g"))
    rec.write()
    return {"rows": rec.rows}


if __name__ == "__main__":
    main()
