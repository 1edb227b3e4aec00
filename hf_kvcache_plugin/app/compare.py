"""``hf-kvcache compare``: one prompt through ``DynamicCache`` and each quantization type, side by side.

Each cache generates the same greedy continuation length (``min_new_tokens``
pins it, so the texts line up token by token). The table shows, per cache,
every byte it holds afterwards (codes, scales, zeros, residual window), the
ratio to ``DynamicCache``, bits per cached element (metadata included),
tokens/s of the whole ``generate`` call (prefill included, one run each: a
rough figure), greedy agreement with ``DynamicCache`` (share of new tokens
equal at the same position) and the text's first words.

``--plot`` draws cache bytes against context length for each cache up to the
model's positions. Those bytes are predicted from the layout
(``budget.layer_nbytes_after`` on meta tensors: nothing is allocated or
computed, any context length costs the same); the generated run's bytes are
measured and agree with that prediction.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .._compat import GENERATE_CACHE_KWARG
from ..attention.dispatch import prepare_fused_attention
from ..budget import layer_nbytes, layer_nbytes_after
from ..cache import QuantizedKVCache
from ..config import QUANT_TYPES, CacheConfig, PluginConfig, load_config
from .models import format_bytes, load_model, resolve_model
from .terminal import TokenProgress, progress_disable

__all__ = [
    "DYNAMIC", "CompareRow", "add_compare_parser", "bytes_by_context", "compare_caches", "format_compare_table",
    "plot_bytes_by_context",
]

DYNAMIC = "dynamic"
DEFAULT_PROMPT = "Once upon a time"
DEFAULT_NEW_TOKENS = 200
# --quick: a short run whose context still outgrows a one-block residual window, and a coarse plot
QUICK_NEW_TOKENS = 32
PLOT_POINTS, QUICK_PLOT_POINTS = 64, 16
TEXT_WORDS = 8


@dataclass(frozen=True)
class CompareRow:
    """One cache's run; ``agreement`` is the share of new tokens equal to ``DynamicCache``'s at each position."""

    cache: str
    cache_bytes: int
    ratio: float
    bits_per_element: float
    tokens_per_s: float
    agreement: float
    text: str


def _kv_shape(model_config) -> tuple[int, int]:
    """(KV heads, head_dim) of the decoder."""
    text = model_config.get_text_config(decoder=True)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return heads, head_dim


def _make_cache(kind: str, model_config, cache_config: CacheConfig):
    if kind == DYNAMIC:
        return DynamicCache(config=model_config)
    return QuantizedKVCache(model_config, cache_config=dataclasses.replace(cache_config, quant_type=kind))


def _held_bytes(cache) -> int:
    if isinstance(cache, QuantizedKVCache):
        return cache.get_stats()["total_bytes"]
    return sum(layer_nbytes(layer) for layer in cache.layers)


def compare_caches(
    model,
    tokenizer,
    prompt: str,
    cache_config: CacheConfig,
    max_new_tokens: int,
    quant_types: Sequence[str] = QUANT_TYPES,
    disable_progress: bool | None = None,
) -> list[CompareRow]:
    """``DynamicCache`` first, then each of ``quant_types``, on the same greedy generation of ``max_new_tokens``."""
    if max_new_tokens < 1:
        raise ValueError(f"`--max-new-tokens` has to be >= 1 but got {max_new_tokens}")
    if not prompt.strip():
        raise ValueError("`--prompt` is empty: give the text to continue")
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    prompt_length = inputs["input_ids"].shape[-1]
    if cache_config.attention == "fused":
        prepare_fused_attention()  # build the CPU kernel now, not inside the first timed run
    rows: list[CompareRow] = []
    reference: torch.Tensor | None = None
    reference_bytes = 0
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    for kind in tqdm([DYNAMIC, *quant_types], desc="compare", unit="cache", disable=disable_progress):
        cache = _make_cache(kind, model.config, cache_config)
        progress = TokenProgress(max_new_tokens, desc=kind, disable=disable_progress, leave=False)
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,  # same length for every cache: agreement is position by position
                do_sample=False,
                streamer=progress,
                **{GENERATE_CACHE_KWARG: cache},
            )
        seconds = time.perf_counter() - start
        new_tokens = output[0, prompt_length:]
        held = _held_bytes(cache)
        if reference is None:
            reference, reference_bytes = new_tokens, held
        elements = reference_bytes // itemsize  # keys and values of every cached token, as DynamicCache holds them
        rows.append(
            CompareRow(
                cache=kind,
                cache_bytes=held,
                ratio=reference_bytes / held,
                bits_per_element=8 * held / elements,
                tokens_per_s=len(new_tokens) / seconds,
                agreement=(new_tokens == reference).float().mean().item(),
                text=tokenizer.decode(new_tokens, skip_special_tokens=True),
            )
        )
    return rows


def bytes_by_context(
    model_config, cache_config: CacheConfig, dtype: torch.dtype, contexts: Sequence[int],
    quant_types: Sequence[str] = QUANT_TYPES,
) -> dict[str, list[int]]:
    """Bytes each cache would hold after a prefill of each context length (batch 1), predicted, not allocated."""
    heads, head_dim = _kv_shape(model_config)
    curves: dict[str, list[int]] = {}
    for kind in [DYNAMIC, *quant_types]:
        layers = _make_cache(kind, model_config, cache_config).layers
        curves[kind] = []
        for n in contexts:
            kv = torch.empty(1, heads, n, head_dim, dtype=dtype, device="meta")  # shapes only
            curves[kind].append(sum(layer_nbytes_after(layer, kv, kv) for layer in layers))
    return curves


def plot_bytes_by_context(
    contexts: Sequence[int], curves: dict[str, list[int]], path: str | Path, title: str, run_context: int | None = None
) -> Path:
    """A line per cache: bytes against context length, written as an image (matplotlib, no display needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("`--plot` needs matplotlib: `pip install matplotlib`") from None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for kind, values in curves.items():
        ax.plot(contexts, [v / 2**20 for v in values], label=kind, linestyle="--" if kind == DYNAMIC else "-")
    if run_context is not None:
        ax.axvline(run_context, color="grey", linewidth=0.8, linestyle=":", label=f"this run ({run_context} tokens)")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("cache bytes (MiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def format_compare_table(rows: Sequence[CompareRow], words: int = TEXT_WORDS) -> str:
    """The aligned text table ``compare`` prints."""
    header = ("cache", "bytes", "ratio", "bits/elem", "tok/s", "agreement", "text")
    lines = [
        (
            row.cache,
            format_bytes(row.cache_bytes),
            f"{row.ratio:.2f}x",
            f"{row.bits_per_element:.2f}",
            f"{row.tokens_per_s:.0f}",
            f"{row.agreement:.1%}",
            " ".join(row.text.split()[:words]) + " ...",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) if i in (0, 6) else cell.rjust(width) for i, (cell, width) in
                  enumerate(zip(line, [*widths, 0]))).rstrip()
        for line in [header, *lines]
    )


def _plot_contexts(model_config, points: int) -> list[int]:
    longest = getattr(model_config.get_text_config(decoder=True), "max_position_embeddings", None) or 4096
    return sorted({max(1, round(longest * i / points)) for i in range(1, points + 1)})


def _compare(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else PluginConfig()
    cache_config = config.cache
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = QUICK_NEW_TOKENS if args.quick else DEFAULT_NEW_TOKENS
    model_name = resolve_model(args.model, config)
    model, tokenizer = load_model(model_name, args.device)
    cache_config = cache_config.for_model(model.config.get_text_config(decoder=True).num_hidden_layers,
                                          _kv_shape(model.config)[1])
    if args.residual_length is not None:
        cache_config = dataclasses.replace(cache_config, residual_length=args.residual_length)
    elif args.quick:  # one block stays exact, so even a short run quantizes some
        cache_config = dataclasses.replace(cache_config, residual_length=cache_config.group_size)
    disable = progress_disable(args.no_progress)
    rows = compare_caches(model, tokenizer, args.prompt, cache_config, max_new_tokens, args.quant_types, disable)
    prompt_length = len(tokenizer(args.prompt)["input_ids"])
    shown = "stories260K (embedded)" if args.model is None and config.model is None else model_name
    settings = (f"group {cache_config.group_size}, residual window {cache_config.residual_length} tokens exact, "
                f"{str(model.dtype).removeprefix('torch.')}, {model.device}")
    print(f"{shown}: {prompt_length} prompt + {max_new_tokens} new tokens, greedy; {settings}")
    print(format_compare_table(rows))
    if args.plot:
        contexts = _plot_contexts(model.config, QUICK_PLOT_POINTS if args.quick else PLOT_POINTS)
        curves = bytes_by_context(model.config, cache_config, model.dtype, contexts, args.quant_types)
        path = plot_bytes_by_context(contexts, curves, args.plot, f"{shown}: KV cache bytes\n{settings}",
                                     run_context=prompt_length + max_new_tokens - 1)
        print(f"[plot] {path}")
    return 0


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    compare = sub.add_parser(
        "compare", help="run one prompt with DynamicCache and each quantization type and print one table"
    )
    compare.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text to continue (default {DEFAULT_PROMPT!r})")
    compare.add_argument("--model", help="Hugging Face model id or local path (default as for `generate`)")
    compare.add_argument("--config", help="YAML config: its `cache:` section is the base of every quantized run")
    compare.add_argument("--quant-types", nargs="+", choices=QUANT_TYPES, default=list(QUANT_TYPES))
    compare.add_argument("--max-new-tokens", type=int,
                         help=f"tokens generated by each cache (default {DEFAULT_NEW_TOKENS}; --quick {QUICK_NEW_TOKENS})")
    compare.add_argument("--residual-length", type=int, help="newest tokens kept exact (overrides the config)")
    compare.add_argument("--plot", metavar="PNG", help="also draw cache bytes against context length into this image")
    compare.add_argument("--quick", action="store_true",
                         help=f"{QUICK_NEW_TOKENS} new tokens, a residual window of one block, a coarser plot")
    compare.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars (none when not a terminal)")
    compare.set_defaults(func=_compare)
