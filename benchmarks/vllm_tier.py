"""vLLM with our prefix tier: many requests over a few long shared prefixes, the tier under one byte budget.

Four configurations run one after another on the same requests (same order):
vLLM alone, and vLLM with ``HFKVCacheConnector`` as a full-precision tier,
an INT8 tier and an INT4 tier, all three under the same budget (MiB of tensor
bytes). vLLM's own prefix cache is off in all four, so every skipped prefill is
a hit of the tier (vLLM's own cache lives in its KV buffer and is bounded by
it; the tier is the memory beyond it). The budget holds every prefix at INT8
but only about half of them in full precision.

Per configuration: token hit rate (prompt tokens vLLM did not compute / prompt
tokens), time to first token (wall time of a one-token request, sequential,
after one warm-up request), the tier's bytes per cached token (used bytes /
tokens held), and how many first tokens equal vLLM alone's. Engine in this
process (VLLM_ENABLE_V1_MULTIPROCESSING=0), model a random Llama of head_dim
64 in bfloat16 (tests_vllm/tiny_model.py). Needs vLLM's venv (see README):

    .venv-vllm/bin/python benchmarks/vllm_tier.py            # 48 requests, 4 prefixes of 768 tokens
    .venv-vllm/bin/python benchmarks/vllm_tier.py --quick    # 12 requests, 2 prefixes of 384
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests_vllm.tiny_model
sys.path.insert(0, str(HERE))  # records

from records import Recorder, format_table  # noqa: E402

BLOCK = 128
MIB = 2**20


def make_llm(model_dir: Path, dtype: str, kv_transfer_config=None):
    from vllm import LLM

    return LLM(
        model=str(model_dir), dtype=dtype, enable_prefix_caching=False, kv_transfer_config=kv_transfer_config,
        max_model_len=2048, block_size=BLOCK, enforce_eager=True, max_num_seqs=4, max_num_batched_tokens=2048,
    )  # fmt: skip


def close_llm(llm) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def tier(name: str, budget_mb: float):
    from vllm.config import KVTransferConfig

    extra = {"prefix_store": {"max_size_mb": budget_mb}}
    if name == "full precision":
        extra["full_precision"] = True
    else:
        extra["cache"] = {"quant_type": name.lower(), "group_size": 32}
    return KVTransferConfig(kv_connector="HFKVCacheConnector", kv_role="kv_both", kv_connector_extra_config=extra)


def run(llm, requests: list[list[int]]) -> tuple[list[float], list[int], list[int]]:
    """Sequential one-token requests: (seconds each, prompt tokens vLLM did not compute, first token)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0)
    # warm-up: shorter than a block, so the tier stores nothing of it
    llm.generate([{"prompt_token_ids": requests[0][: BLOCK // 4]}], params, use_tqdm=False)
    seconds, cached, first = [], [], []
    for prompt in requests:
        start = time.perf_counter()
        (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
        cached.append(out.num_cached_tokens)
        first.append(out.outputs[0].token_ids[0])
    return seconds, cached, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--prefixes", type=int)
    parser.add_argument("--prefix-tokens", type=int)
    parser.add_argument("--suffix-tokens", type=int, default=64, help="under one block: never stored")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    n_requests = args.requests or (12 if args.quick else 48)
    n_prefixes = args.prefixes or (2 if args.quick else 4)
    prefix_tokens = args.prefix_tokens or (384 if args.quick else 768)
    if prefix_tokens % BLOCK:
        parser.error(f"--prefix-tokens has to be a multiple of vLLM's block size {BLOCK}")

    from vllm.config import KVTransferConfig  # noqa: F401  (fail early outside vLLM's venv)

    from hf_kvcache_plugin.integrations.vllm_connector import store_address
    from hf_kvcache_plugin.integrations.vllm_store import connect_store
    from tests_vllm.tiny_model import build_tiny_llama

    rng = random.Random(0)
    prefixes = [[rng.randrange(3, 512) for _ in range(prefix_tokens)] for _ in range(n_prefixes)]
    order = [i % n_prefixes for i in range(n_requests)]
    rng.shuffle(order)
    requests = [prefixes[i] + [rng.randrange(3, 512) for _ in range(args.suffix_tokens)] for i in order]
    prompt_tokens = sum(len(r) for r in requests)

    # budget: every prefix at INT8 (exact chunk bytes measured by a first INT8 pass would be circular;
    # this is the INT8 formula for the model: codes + fp16 scale and zero per group of 32, K and V)
    kv_elems_per_chunk = 2 * args.layers * args.heads * BLOCK * 64
    int8_chunk = kv_elems_per_chunk + kv_elems_per_chunk // 32 * 2 * 2
    budget_mb = n_prefixes * (prefix_tokens // BLOCK) * int8_chunk / MIB

    settings = dict(
        requests=n_requests, prefixes=n_prefixes, prefix_tokens=prefix_tokens, suffix_tokens=args.suffix_tokens,
        layers=args.layers, kv_heads=args.heads, head_dim=64, dtype=args.dtype, block_size=BLOCK,
        tier_budget_mb=round(budget_mb, 3), vllm_prefix_caching=False, ttft="wall time of a 1-token request",
    )  # fmt: skip
    recorder = Recorder("vllm_tier_quick" if args.quick else "vllm_tier", settings)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_llama(Path(tmp), layers=args.layers, heads=args.heads)
        reference_first = None
        for name in ("vLLM alone", "full precision", "INT8", "INT4"):
            llm = make_llm(model_dir, args.dtype, None if name == "vLLM alone" else tier(name, budget_mb))
            seconds, cached, first = run(llm, requests)
            row = dict(
                config=name if name == "vLLM alone" else f"+ {name} tier",
                token_hit_rate=sum(cached) / prompt_tokens,
                ttft_median_ms=1e3 * statistics.median(seconds),
                ttft_mean_ms=1e3 * statistics.mean(seconds),
                ttft_p90_ms=1e3 * sorted(seconds)[int(0.9 * (len(seconds) - 1))],
            )
            if reference_first is None:
                reference_first = first
            row["first_token_agreement"] = sum(a == b for a, b in zip(first, reference_first)) / len(first)
            if name != "vLLM alone":
                stats = connect_store(*store_address(llm.llm_engine.vllm_config), timeout_s=5).stats()
                held_tokens = stats["entries"] * BLOCK
                row.update(
                    tier_used_mb=stats["used_bytes"] / MIB,
                    tier_tokens_held=held_tokens,
                    bytes_per_cached_token=stats["used_bytes"] / held_tokens if held_tokens else None,
                    evictions=stats["evictions"],
                )
            recorder.add(**row)
            close_llm(llm)
    alone = recorder.rows[0]["ttft_median_ms"]
    for row in recorder.rows:
        row["ttft_median_vs_alone"] = row["ttft_median_ms"] / alone
    columns = [
        "config", "token_hit_rate", "ttft_median_ms", "ttft_p90_ms", "ttft_median_vs_alone", "bytes_per_cached_token",
        "tier_tokens_held", "tier_used_mb", "evictions", "first_token_agreement",
    ]  # fmt: skip
    print(format_table(recorder.rows, columns))
    print(f"tier budget {budget_mb:.2f} MiB; {n_requests} requests over {n_prefixes} prefixes of {prefix_tokens} tokens")
    recorder.write()


if __name__ == "__main__":
    main()
