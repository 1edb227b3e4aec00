"""How often prefix reuse changes greedy INT8 tokens, and why: N requests with shared prefixes, no faults.

Each request (a shared opening + its own continuation, the soak's prompt mix)
runs four ways, all greedy:

- ``reuse``: through ``attach_prefix_cache`` (the opening's chunks were stored
  by an earlier request; the hit is whole chunks);
- ``plain``: a fresh ``QuantizedKVCache``, the whole prompt prefilled exactly
  (the no-store reference of the tests and the soak);
- ``oracle``: a fresh ``QuantizedKVCache``, the hit's h tokens prefilled,
  ``cache.flush_residual()`` (all h quantized as blocks), then the rest; the
  no-store computation reuse is specified to reproduce bit for bit;
- ``fp``: a ``DynamicCache`` (full precision).

Reported: requests whose reuse output equals plain / oracle / fp, token
agreement (a hit on chunks that were all stored by a prefill from the
prompt's start must equal the oracle bit for bit: asserted; hits on chunks
stored by a request that reused the chunks before them are counted apart), and for each reuse/plain difference the first differing new
token, the top-2 logit margin of both paths there, and both cache layouts.

    python benchmarks/reuse_agreement.py                  # 200 requests, INT8
    python benchmarks/reuse_agreement.py --requests 20    # quick
    python benchmarks/reuse_agreement.py --stored-by chunks   # chunks stored after partial hits
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.records import Recorder, set_threads  # noqa: E402
from hf_kvcache_plugin import CacheConfig, PrefixStore, QuantizedKVCache, attach_prefix_cache  # noqa: E402
from hf_kvcache_plugin._compat import GENERATE_CACHE_KWARG  # noqa: E402
from hf_kvcache_plugin.embedded import STORIES260K  # noqa: E402

REAL_MODEL, TEXT = STORIES260K, REPO.parent / "shared" / "data" / "tinystories_val.txt"


def layout(cache: QuantizedKVCache) -> dict[str, int]:
    layer = cache.layers[0]
    return {"blocks": layer.quantized_keys.num_tokens, "residual": layer.residual_keys.shape[-2]}


def attended(prompt: int, step: int, loaded: int, group: int, residual: int) -> dict[str, int]:
    """What the forward that yields new token ``step`` attends to: tokens read from quantized blocks
    and tokens read exact. Step 0 is the prefill (a plain prefill sees only exact K/V; a hit reads its
    ``loaded`` tokens from blocks); from then on the cache holds prompt + step - 1 tokens before the
    update, quantized in whole blocks beyond the newest ``residual`` (``QuantizedKVLayer._flush_full_blocks``)."""
    if step == 0:
        return {"blocks": loaded, "exact": prompt - loaded}
    held = prompt + step - 1
    blocks = loaded + max(held - loaded - residual, 0) // group * group
    return {"blocks": blocks, "exact": prompt + step - blocks}


def run(model, ids, cache, new_tokens):
    out = type(model).generate(
        model, ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        output_scores=True, return_dict_in_generate=True, **{GENERATE_CACHE_KWARG: cache},
    )  # fmt: skip
    return out.sequences[0, ids.shape[1] :], [s[0] for s in out.scores]


def oracle_cache(model, ids, hit, cfg) -> QuantizedKVCache:
    cache = QuantizedKVCache(model.config, cache_config=cfg)
    model(ids[:, :hit], **{GENERATE_CACHE_KWARG: cache})
    cache.flush_residual()
    return cache


def margin(scores: torch.Tensor) -> float:
    top = scores.topk(2).values
    return float(top[0] - top[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--quant-type", default="int8")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stored-by", choices=("prefill", "chunks"), default="prefill",
                        help="prefill: each opening's chunks are stored by one prefill from its start; chunks: "
                             "chunk c is stored by a request that reused chunks < c (computed attending to them "
                             "quantized, so its bytes differ and the oracle no longer applies)")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    set_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(REAL_MODEL).eval()
    tok = AutoTokenizer.from_pretrained(REAL_MODEL)
    stream = torch.tensor(tok(TEXT.read_text()[:60000], add_special_tokens=False)["input_ids"])
    cfg = CacheConfig(quant_type=args.quant_type, group_size=8, residual_length=16)  # the soak's settings
    chunk = 16
    rng = random.Random(args.seed + 1)
    openings = [stream[i * 97 : i * 97 + rng.choice([40, 56, 72])] for i in range(24)]
    weights = [1 / (rank + 1) for rank in range(len(openings))]
    settings = {**vars(args), "model": "stories260K", "group_size": 8, "residual_length": 16, "chunk_size": chunk}
    suffix = "" if args.stored_by == "prefill" else "_stored_by_chunks"
    rec = Recorder(f"reuse_agreement_{args.quant_type}{suffix}_{args.requests}", settings, args.out_dir)

    store = PrefixStore(max_size_mb=64, chunk_size=chunk)  # no eviction: every request after warm-up hits
    counts = dict.fromkeys(("requests", "reuse_eq_plain", "reuse_eq_oracle", "reuse_eq_fp", "plain_eq_fp",
                            "hits_on_chunks_stored_after_a_hit", "those_eq_oracle", "those_eq_oracle_tokens"), 0)
    tokens = dict.fromkeys(("reuse_vs_plain", "reuse_vs_fp", "plain_vs_fp"), 0)
    with torch.inference_mode(), attach_prefix_cache(model, store, cfg) as hook:
        for opening in openings:  # warm-up: store every opening's full chunks
            ends = [len(opening)] if args.stored_by == "prefill" else range(chunk + 1, len(opening) + 1, chunk)
            for end in ends:
                model.generate(opening[:end].unsqueeze(0), max_new_tokens=1)
        for i in range(args.requests):
            opening = rng.choices(openings, weights)[0]
            start = rng.randrange(20000, len(stream) - 40)
            ids = torch.cat([opening, stream[start : start + rng.randint(2, 24)]]).unsqueeze(0)
            out = model.generate(
                ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                output_scores=True, return_dict_in_generate=True,
            )  # fmt: skip
            hit = hook.records[-1].hit_tokens
            # chunks a prefill from the prompt's start stored: the warm-up's (prefill) or chunk 0 (chunks);
            # chunks beyond were stored by a request that hit the chunks before them (e.g. an earlier
            # request with the same opening and continuation)
            fresh = len(opening) // chunk * chunk if args.stored_by == "prefill" else chunk
            after_a_hit = hit > fresh
            reuse, reuse_scores = out.sequences[0, ids.shape[1] :], [s[0] for s in out.scores]
            plain_cache = QuantizedKVCache(model.config, cache_config=cfg)
            plain, plain_scores = run(model, ids, plain_cache, args.new_tokens)
            orc_cache = oracle_cache(model, ids, hit, cfg)
            oracle, oracle_scores = run(model, ids, orc_cache, args.new_tokens)
            fp, _ = run(model, ids, DynamicCache(config=model.config), args.new_tokens)
            for cache, loaded in ((plain_cache, 0), (orc_cache, hit)):  # the layout formula, checked at the end
                expected = attended(ids.shape[1], args.new_tokens, loaded, 8, 16)
                assert layout(cache) == {"blocks": expected["blocks"], "residual": expected["exact"] - 1}, layout(cache)
            bitwise = torch.equal(reuse, oracle) and all(torch.equal(a, b) for a, b in zip(reuse_scores, oracle_scores))
            counts["requests"] += 1
            counts["reuse_eq_plain"] += torch.equal(reuse, plain)
            counts["reuse_eq_oracle"] += bitwise
            counts["hits_on_chunks_stored_after_a_hit"] += after_a_hit
            counts["those_eq_oracle"] += after_a_hit and bitwise
            counts["those_eq_oracle_tokens"] += after_a_hit and torch.equal(reuse, oracle)
            fresh_not_exact = not after_a_hit and not bitwise
            assert not fresh_not_exact, f"request {i}: a hit on freshly stored chunks differs from the oracle"
            counts["reuse_eq_fp"] += torch.equal(reuse, fp)
            counts["plain_eq_fp"] += torch.equal(plain, fp)
            tokens["reuse_vs_plain"] += int((reuse == plain).sum())
            tokens["reuse_vs_fp"] += int((reuse == fp).sum())
            tokens["plain_vs_fp"] += int((plain == fp).sum())
            if not torch.equal(reuse, plain):
                step = int((reuse != plain).nonzero()[0])
                rec.add(
                    request=i, prompt_tokens=ids.shape[1], hit_tokens=hit, first_differing_new_token=step,
                    plain_token=int(plain[step]), reuse_token=int(reuse[step]), fp_token=int(fp[step]),
                    plain_margin=round(margin(plain_scores[step]), 6), reuse_margin=round(margin(reuse_scores[step]), 6),
                    plain_attends=attended(ids.shape[1], step, 0, 8, 16),
                    reuse_attends=attended(ids.shape[1], step, hit, 8, 16),
                    reuse_bitwise_equals_oracle=bitwise, hit_on_chunks_stored_after_a_hit=after_a_hit,
                    prompt=ids[0].tolist(),
                )  # fmt: skip
    n, total = counts["requests"], counts["requests"] * args.new_tokens
    summary = {
        **counts,
        **{f"token_agreement_{k}": round(v / total, 4) for k, v in tokens.items()},
        "max_plain_margin_at_divergence": max((r["plain_margin"] for r in rec.rows), default=None),
        "hit_tokens_mean": round(sum(r.hit_tokens for r in list(hook.records)[-n:]) / n, 1),
    }
    rec.extra["summary"] = summary
    for key, value in summary.items():
        print(f"{key:<34} {value}")
    for row in rec.rows:
        print({k: v for k, v in row.items() if k != "prompt"})
    rec.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
