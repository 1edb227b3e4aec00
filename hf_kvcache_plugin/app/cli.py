"""``hf-kvcache``: generate with a quantized KV cache from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from importlib import metadata

import torch

from ..cache import QuantizedKVCache
from ..config import QUANT_TYPES, PluginConfig, load_config
from .._compat import GENERATE_CACHE_KWARG
from .compare import add_compare_parser
from .models import format_bytes, load_model, resolve_model
from .serve import add_serve_parser
from .terminal import LOG_LEVELS, TokenProgress, cli_output, progress_disable

__all__ = ["build_parser", "main"]

def _generate(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else PluginConfig()
    if args.quant_type:
        config.cache = dataclasses.replace(config.cache, quant_type=args.quant_type)
    model_name = resolve_model(args.model, config)
    model, tokenizer = load_model(model_name, args.device)
    if not args.prompt:
        raise ValueError("`--prompt` is empty: give the text to continue")
    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    # with `attention: fused` the cache switches an SDPA model to kvquant_sdpa (logged at info)
    cache = QuantizedKVCache.from_config(config, model.config)
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            streamer=TokenProgress(args.max_new_tokens, disable=progress_disable(args.no_progress)),
            **{GENERATE_CACHE_KWARG: cache},
        )
    print(tokenizer.decode(output[0], skip_special_tokens=True))
    stats = cache.get_stats()
    print(
        f"[kv cache] {config.cache.quant_type}: {format_bytes(stats['total_bytes'])} for {stats['seq_length']} tokens "
        f"vs DynamicCache {format_bytes(stats['fp_bytes'])} in {model.dtype} "
        f"({stats['compression_ratio']:.2f}x smaller)"
    )
    return 0


def _version() -> str:
    try:
        ours = metadata.version("hf_kvcache_plugin")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        ours = "(not installed)"
    return f"hf-kvcache {ours} (transformers {metadata.version('transformers')}, torch {torch.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-kvcache", description=__doc__)
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="warning",
                        help="show the package's log lines from this level on (info: which attention path runs)")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text with a quantized KV cache and print its memory")
    gen.add_argument("--model", help="Hugging Face model id or local path (default: config `model:`, then "
                     "the embedded stories260K)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--config", help="YAML config (see configs/)")
    gen.add_argument("--quant-type", choices=QUANT_TYPES, help="overrides the config")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar (none is drawn when not a terminal)")
    gen.set_defaults(func=_generate)
    add_serve_parser(sub)
    add_compare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with cli_output(args.log_level, getattr(args, "no_progress", False)):
            return args.func(args)
    except ValueError as exc:
        print(f"hf-kvcache: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # python -m hf_kvcache_plugin.app.cli
    sys.exit(main())
